"""``opsd-mm data inspect``: the data loaded as training loads it, with the column mapping, row
counts, counted skips with reasons and rendered student and teacher prompts, also on file."""

import json

from opsd_mm.cli import main
from tests.fixtures.schemas import write_copy


def test_data_inspect_prints_and_writes(tmp_path, tiny_cache, capsys):
    source = write_copy("mathvision", tmp_path / "data", "jsonl")
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    rows[2]["solution"] = None  # skipped: no privileged trace
    rows[3]["image"] = "images/missing.jpg"  # skipped: image not found
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "inspect.txt"
    argv = ["data", "inspect", "configs/tiny_vl.yaml", "data.preset=mathvision"]
    argv += [f"data.source={source}", f"model.tiny_cache_dir={tiny_cache}"]
    assert main([*argv, "--n", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    written = out.read_text()
    assert written in printed
    for line in (
        "columns (preset mathvision): question + options (official format)",
        "preset hub id: MathLLMs/MathVision",
        "student template: opsd_student_v1; teacher template: opsd_teacher_v1",
        "rows: 4 read, 2 mapped, 2 kept (2 skipped, 0 dropped after mapping)",
        "  1 x empty privileged trace",
        "  1 x image not found",
        "==== example 2/2: 2 ====",
        "(A) 24\n(B) 25\n(C) 26\n(D) 27\n(E) 0",
        "=== Reference Solution Begin ===\nWidth times height: 24.",
        "[image 1: 56x56 -> grid [1, 4, 4] -> 4 tokens]",
    ):
        assert line in written, line
    assert written.count("---- student prompt") == written.count("---- teacher prompt") == 2


def test_data_inspect_text_preset(tmp_path, tiny_cache, capsys):
    source = write_copy("opsd_math", tmp_path / "data", "parquet")
    argv = ["data", "inspect", "configs/tiny_text.yaml", "data.preset=opsd_math"]
    argv += [f"data.source={source}", f"model.tiny_cache_dir={tiny_cache}", f"run_dir={tmp_path}"]
    assert main([*argv, "--n", "1"]) == 0
    written = (tmp_path / "data_inspect.txt").read_text()
    assert "columns (preset opsd_math): problem -> question; solution -> privileged" in written
    assert "Problem: Compute 2 + 5." in written and "2 + 5 = 7. \\boxed{7}" in written
