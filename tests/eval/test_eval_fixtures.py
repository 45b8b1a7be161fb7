"""The generated fixtures load through each benchmark's ``--data-dir`` path with the hub
datasets' columns, and include the broken rows the error-path tests rely on."""

from __future__ import annotations

import datasets
import pytest

from opsd_mm.eval.benchmarks._common import EvalError
from opsd_mm.eval.registry import get_benchmark, list_benchmarks

HUB_COLUMNS = {
    "mmmu": [
        "id",
        "question",
        "options",
        "explanation",
        *(f"image_{k}" for k in range(1, 8)),
        "img_type",
        "answer",
        "topic_difficulty",
        "question_type",
        "subfield",
    ],
    "mathvista": [
        "pid",
        "question",
        "image",
        "decoded_image",
        "choices",
        "unit",
        "precision",
        "answer",
        "question_type",
        "answer_type",
        "metadata",
        "query",
    ],
    "mathvision": [
        "id",
        "question",
        "options",
        "image",
        "decoded_image",
        "answer",
        "solution",
        "level",
        "subject",
    ],
    "wemath": [
        "ID",
        "split",
        "knowledge concept",
        "question",
        "option",
        "answer",
        "image_path",
        "key",
        "question number",
        "knowledge concept description",
    ],
    "zerobench": [
        "question_id",
        "question_text",
        "question_images_decoded",
        "question_answer",
        "question_images",
        "image_attribution",
    ],
    "aime24": ["id", "problem", "solution", "answer", "url", "year"],
    "aime25": ["problem_idx", "problem", "answer", "problem_type"],
    "hmmt25": ["problem_idx", "problem", "answer", "problem_type"],
    "amo_bench": ["question_id", "prompt", "solution", "answer", "answer_type"],
    "math500": ["problem", "solution", "answer", "subject", "level", "unique_id"],
}
HUB_COLUMNS["mathvision_mini"] = HUB_COLUMNS["mathvision"]
HUB_COLUMNS["zerobench_sub"] = HUB_COLUMNS["zerobench"]


@pytest.mark.parametrize("name", list_benchmarks())
def test_fixture_has_hub_schema(fixture_root, name):
    ds = get_benchmark(name).load(fixture_root)
    assert isinstance(ds, datasets.Dataset) and 3 <= len(ds) <= 8
    assert ds.column_names == HUB_COLUMNS[name]


def test_images_are_generated_and_one_is_missing(fixture_root):
    ds = get_benchmark("mmmu").load(fixture_root)
    assert ds[0]["image_1"].size == (64, 48)
    assert ds[4]["image_1"] is None  # validation_Biology_5 references a missing image
    assert get_benchmark("mathvista").load(fixture_root)[3]["decoded_image"] is None


def test_missing_local_copy_names_the_path(tmp_path):
    with pytest.raises(EvalError, match="save_to_disk.*MMMU/MMMU"):
        get_benchmark("mmmu").load(tmp_path)


def test_dataset_dict_copies_are_accepted(fixture_root, tmp_path):
    ds = get_benchmark("math500").load(fixture_root)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "math500"))
    assert len(get_benchmark("math500").load(tmp_path)) == len(ds)
