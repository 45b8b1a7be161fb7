"""Regions in the data: the data.columns.regions formats and units, ms-swift grounding objects in
the messages preset, bad values skipped as bad rows, boxes outside their image dropped as bad
images when a view reads them, and ``data inspect`` showing and writing each role's view."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from opsd_mm.cli import main
from opsd_mm.config import ColumnsConfig, DataConfig
from opsd_mm.data.load import load_examples, rows_to_examples
from opsd_mm.data.preset_rows import RowSkip, regions, swift_objects
from opsd_mm.data.presets import get_preset
from opsd_mm.types import Region


@pytest.mark.parametrize(
    "value, units, want",
    [
        (None, "pixel", ()),
        ([1, 2, 30, 40], "pixel", (Region(0, (1, 2, 30, 40)),)),
        ([[1, 2, 30, 40], None, [5, 6, 7, 8]], "pixel", (
            Region(0, (1, 2, 30, 40)), Region(2, (5, 6, 7, 8)),
        )),
        ([[[1, 2, 3, 4], [5, 6, 7, 8]]], "pixel", (
            Region(0, (1, 2, 3, 4)), Region(0, (5, 6, 7, 8)),
        )),
        ("[[0.1, 0.2, 0.5, 0.6]]", "normalized", (Region(0, (0.1, 0.2, 0.5, 0.6), True),)),
        ([100, 200, 500, 1000], "normalized_1000", (Region(0, (0.1, 0.2, 0.5, 1.0), True),)),
        ("", "pixel", ()),
    ],
)  # fmt: skip
def test_region_column_formats(value, units, want):
    assert regions(value, units) == want


@pytest.mark.parametrize(
    "value, reason",
    [
        ("[1, 2", "not JSON"),
        (7, "expected boxes"),
        ([[1, 2, 3]], "image 1's entry is neither a box"),
        ([[1, 2, 3, "x"]], "image 1's entry"),
        ([None, [[1, 2, 3, 4], [1, 2]]], "image 2's entry"),
        ([[float("nan"), 2, 3, 4]], "image 1's entry"),
    ],
)
def test_bad_region_values_are_skips_with_a_reason(value, reason):
    with pytest.raises(RowSkip, match=f"bad regions: .*{reason}"):
        regions(value)


def test_swift_grounding_objects():
    objects = {"ref": ["a", "b"], "bbox": [[1, 2, 3, 4], [10, 20, 30, 40]], "image_id": [0, 1]}
    assert swift_objects(objects) == (Region(0, (1, 2, 3, 4)), Region(1, (10, 20, 30, 40)))
    norm = {"bbox": [[100, 0, 500, 1000]], "bbox_type": "norm1000"}
    assert swift_objects(norm) == (Region(0, (0.1, 0.0, 0.5, 1.0), True),)
    assert swift_objects({"bbox": [[0.1, 0.2, 0.3, 0.4]], "bbox_type": "norm1"})[0].normalized
    assert swift_objects(None) == swift_objects({"ref": [], "bbox": []}) == ()
    with pytest.raises(RowSkip, match="unknown bbox_type 'xyxy'"):
        swift_objects({"bbox": [[1, 2, 3, 4]], "bbox_type": "xyxy"})
    with pytest.raises(RowSkip, match="2 boxes but 1 image ids"):
        swift_objects({"bbox": [[1, 2, 3, 4], [1, 2, 3, 4]], "image_id": [0]})


def test_messages_preset_maps_objects_to_regions():
    row = {
        "messages": [
            {"role": "user", "content": "<image>Which colour is the boxed cell?"},
            {"role": "assistant", "content": "Red."},
        ],
        "images": ["a.png"],
        "objects": {"ref": ["cell"], "bbox": [[4, 4, 12, 12]], "bbox_type": "real"},
    }
    examples, _ = rows_to_examples([row], get_preset("messages"))
    assert examples[0].regions == (Region(0, (4, 4, 12, 12)),)


def _rows(tmp_path):
    (tmp_path / "img").mkdir()
    for name, size in (("a", (60, 40)), ("b", (30, 30))):
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / "img" / f"{name}.png")
    return [
        {"id": "ok", "problem": "<image> one?", "solution": "s", "images": ["img/a.png"],
         "boxes": [[10, 5, 30, 25]]},
        {"id": "two", "problem": "<image> <image> two?", "solution": "s",
         "images": ["img/a.png", "img/b.png"], "boxes": [None, [[0, 0, 15, 15], [15, 15, 30, 30]]]},
        {"id": "none", "problem": "<image> no box?", "solution": "s", "images": ["img/a.png"],
         "boxes": None},
        {"id": "garbled", "problem": "<image> ?", "solution": "s", "images": ["img/a.png"],
         "boxes": "[1, 2"},
        {"id": "outside", "problem": "<image> ?", "solution": "s", "images": ["img/b.png"],
         "boxes": [[10, 10, 40, 20]]},
    ]  # fmt: skip


def test_regions_column_loads_and_bad_values_skip(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(tmp_path)))
    cfg = DataConfig(
        source=str(path), columns=ColumnsConfig(id="id", images="images", regions="boxes")
    )
    examples, report = load_examples(cfg)
    by_id = {ex.id: ex for ex in examples}
    assert by_id["ok"].regions == (Region(0, (10, 5, 30, 25)),)
    assert [r.image for r in by_id["two"].regions] == [1, 1]
    assert by_id["none"].regions == ()
    assert "outside" in by_id  # fits no image: found when a view reads it (below)
    assert report.skipped == [("garbled", "bad regions: not JSON (Expecting ',' delimiter)")]


def test_data_inspect_shows_each_roles_view_and_drops_bad_boxes(tmp_path, tiny_cache, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(tmp_path)))
    out = tmp_path / "inspect.txt"
    argv = [
        "data", "inspect", "configs/tiny_vl.yaml", f"data.source={path}",
        "data.columns={id: id, question: problem, privileged: solution, images: images, "
        "regions: boxes}",
        "processor.teacher_view=[{op: zoom, placement: extra, pixels: 3136}, {op: mark}]",
        "processor.student_view=[{op: resolution, max_pixels: 784}, {op: grayscale}]",
        f"model.tiny_cache_dir={tiny_cache}", "--n", "2", "--output", str(out),
    ]  # fmt: skip
    stale = tmp_path / "inspect_images" / "007_teacher_3.png"  # from an earlier inspect
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    assert main(argv) == 0
    written = out.read_text()
    for line in (
        "student view: resolution(max_pixels=784), grayscale",
        "teacher view: zoom(pixels=3136, placement=extra), mark",
        "rows: 5 read, 4 mapped, 3 kept (1 skipped, 1 dropped after mapping)",
        "e.g. outside: bad image: region 1 (image 1): box [10, 10, 40, 20] (pixels of the 30x30 "
        "image) lies outside the image",
        "[image 1: 28x28 -> grid [1, 2, 2] -> 1 tokens]",  # the student's: 784 pixels at most
        "[image 2: 56x56 -> grid [1, 4, 4] -> 4 tokens]",  # the teacher's zoom: 3136 pixels
    ):
        assert line in written, line
    files = sorted(p.name for p in (tmp_path / "inspect_images").iterdir())
    assert files == [
        "001_student_1.png", "001_teacher_1.png", "001_teacher_2.png",
        "002_student_1.png", "002_student_2.png",
        "002_teacher_1.png", "002_teacher_2.png", "002_teacher_3.png",
    ]  # fmt: skip
    gray = Image.open(tmp_path / "inspect_images" / "001_student_1.png")
    assert len(set(gray.getpixel((5, 5)))) == 1  # the student's view is grayscale
    assert "(written to" in capsys.readouterr().out
