"""Dataset presets on small local copies of the real schemas (JSONL + image files, parquet,
save_to_disk), and the errors a user meets first."""

import json

import pytest

from opsd_mm.config import ColumnsConfig, ConfigError, DataConfig, load_config
from opsd_mm.data.load import DataError, load_examples
from opsd_mm.data.preset_rows import mathvision_options
from opsd_mm.data.presets import PRESETS, TEMPLATE_NEEDS, resolve_data
from tests.fixtures.schemas import BUILDERS, FORMATS, write_copy

EXPECTED = {  # preset -> (split, teacher template, privileged non-empty, answer of row 1)
    "wemath2_standard": ("standard", "hint_v1", True, "24"),
    "wemath2_pro": ("pro", "answer_only_v1", False, "24"),
    "wemath2_sft": ("train", "opsd_teacher_v1", True, None),
    "messages": ("train", "opsd_teacher_v1", True, None),
    "mathvision": ("test", "opsd_teacher_v1", True, "A"),
    "mmfinereason": ("train", "opsd_teacher_v1", True, "24"),
    "virl39k": ("train", "answer_only_v1", False, "24"),
    "opsd_math": ("train", "opsd_teacher_v1", True, "9"),
}


def _load(preset, source, *extra):
    cfg = resolve_data(
        load_config(None, [f"data.preset={preset}", f"data.source={source}", *extra])
    )
    return cfg, *load_examples(cfg.data)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("preset", sorted(BUILDERS))
def test_preset_loads_real_schema_unchanged(preset, fmt, tmp_path):
    cfg, examples, report = _load(preset, write_copy(preset, tmp_path, fmt))
    split, template, has_privileged, answer = EXPECTED[preset]
    assert (cfg.data.split, cfg.processor.teacher_template) == (split, template)
    assert report.kept == len(examples) == 4 and not report.skipped
    ex = examples[1]
    assert ex.question.strip() and bool(ex.privileged.strip()) == has_privileged
    assert ex.answer == answer
    if preset != "opsd_math":
        assert len(ex.images) == 1
        src = ex.images[0]
        assert isinstance(src, dict) or (isinstance(src, str) and src.startswith("/"))


def test_template_needs_match_the_templates():
    from opsd_mm.processors.templates import TEMPLATES

    for name, needs in TEMPLATE_NEEDS.items():
        assert needs == TEMPLATES[name].fields & {"privileged", "answer"}
    for preset in PRESETS.values():
        assert TEMPLATES[preset.teacher_template].role == "teacher"


def test_mathvision_options_are_the_official_block():
    from opsd_mm.eval.benchmarks.mathvision import format_options

    for opts in ([], ["A", "B", "C", "D", "E"], ["3", "4", "5", "6", "7"], ["x = 1", "y"]):
        assert mathvision_options(opts) == format_options(opts)
    row = BUILDERS["mathvision"](1)
    (ex,), _ = load_examples_from_rows("mathvision", [row])
    assert ex.question.endswith("\n(A) 24\n(B) 25\n(C) 26\n(D) 27\n(E) 0")
    assert ex.meta["image_placeholders"] is False  # <image1> is text: one composite image


def load_examples_from_rows(preset, rows):
    from opsd_mm.data.load import rows_to_examples
    from opsd_mm.data.presets import get_preset

    return rows_to_examples(rows, get_preset(preset), require_privileged=False)


def test_unknown_preset_is_an_error_even_for_synthetic_sources():
    with pytest.raises(ConfigError, match="data.preset: unknown preset 'nope'.*virl39k"):
        resolve_data(load_config(None, ["data.preset=nope"]))
    with pytest.raises(DataError, match="unknown preset 'nope'"):
        load_examples(DataConfig(source="synthetic:arithmetic", preset="nope"))


def test_missing_split_lists_splits_and_names_the_key(tmp_path):
    src = write_copy("wemath2_pro", tmp_path, "disk")
    with pytest.raises(DataError, match=r"data.split: 'train' not in .*\['pro'\].*data.split=pro"):
        _load("wemath2_pro", src, "data.split=train")


def test_missing_relative_image_names_directory_and_data_dir(tmp_path):
    src = write_copy("virl39k", tmp_path / "copy", "jsonl")
    moved = tmp_path / "elsewhere" / "virl39k.jsonl"
    moved.parent.mkdir()
    moved.write_text(src.read_text())
    with pytest.raises(DataError) as err:
        _load("virl39k", moved)
    msg = str(err.value)
    assert "images/virl39k-0-image-0.png" in msg and str(moved.parent) in msg
    assert "data.data_dir" in msg
    _, examples, _ = _load("virl39k", moved, f"data.data_dir={tmp_path / 'copy'}")
    assert len(examples) == 4


def test_answer_only_template_needs_no_second_key(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        "".join(json.dumps({"q": f"What is {i}+1?", "a": str(i + 1)}) + "\n" for i in range(3))
    )
    cfg = DataConfig(
        source=str(path), columns=ColumnsConfig(question="q", privileged=None, answer="a")
    )
    examples, _ = load_examples(cfg, teacher_fields=frozenset({"question", "answer"}))
    assert [e.answer for e in examples] == ["1", "2", "3"]
    with pytest.raises(DataError, match="empty privileged trace"):
        load_examples(cfg, teacher_fields=frozenset({"question", "privileged"}))


def test_explicit_template_and_split_win_over_the_preset(tmp_path):
    cfg = resolve_data(
        load_config(
            None,
            ["data.preset=virl39k", "processor.teacher_template=hint_v1", "data.split=other"],
        )
    )
    assert (cfg.processor.teacher_template, cfg.data.split) == ("hint_v1", "other")


def test_messages_variants_and_counted_skips(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image>Q1?"},
                {"from": "gpt", "value": "T1"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "human", "value": "c"},
                {"from": "gpt", "value": "d"},
            ]
        },
        {"conversations": [{"from": "human", "value": "no answer"}]},
    ]
    examples, report = load_examples_from_rows("messages", rows)
    assert [(e.question, e.privileged) for e in examples] == [("<image>Q1?", "T1")]
    assert [why for _, why in report.skipped] == [
        "multi-turn conversation (only single-turn rows are used)",
        "messages do not end with a user turn followed by an assistant turn",
    ]
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "T"}]},
        ],
        "images": [],
    }
    (ex,), _ = load_examples_from_rows("messages", [parts])
    assert (ex.question, ex.privileged) == ("<image>Q?", "T")


@pytest.mark.parametrize(
    ("recipe", "split", "template"),
    [
        ("qwen2.5_vl_7b_wemath.yaml", "standard", "hint_v1"),
        ("qwen3_vl_8b_mathvision_style.yaml", "train", "opsd_teacher_v1"),
    ],
)
def test_recipes_resolve_their_preset(recipe, split, template):
    from pathlib import Path

    cfg = resolve_data(load_config(Path(__file__).resolve().parents[2] / "configs" / recipe))
    assert (cfg.data.split, cfg.processor.teacher_template) == (split, template)
    assert cfg.data.exclude_contaminated and "mathvision" in cfg.data.contamination_benchmarks
