"""``opsd-mm eval`` end to end, offline: the fixture benchmarks on the tiny text and VL models
(real processors and the HF engine), re-scored with ``opsd-mm eval score``; a resumed sampled
run reproduces an uninterrupted one."""

from __future__ import annotations

import argparse
import json

import pytest

from opsd_mm.eval.cli import add_eval_parser, main_eval

pytestmark = pytest.mark.slow
TEXT = "aime24,aime25,hmmt25,amo_bench,math500"
VL = "mmmu,mathvista,mathvision,wemath,zerobench"


def eval_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opsd-mm")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["eval", *argv])


def run(model, names, root, out, *extra):
    args = eval_args(
        "--model", str(model), "--benchmarks", names, "--data-dir", str(root),
        "--output", str(out), "--max-new-tokens", "8", "--no-progress", *extra,
    )  # fmt: skip
    assert main_eval(args) == 0
    return json.loads((out / "summary.json").read_text())


def assert_rescoring_reproduces(summary, root, out, tmp_path):
    for name in summary:
        args = eval_args(
            "score", "--benchmark", name, "--predictions", str(out / name / "predictions.jsonl"),
            "--data-dir", str(root), "--output", str(tmp_path / "rescored"),
        )  # fmt: skip
        assert main_eval(args) == 0
    assert json.loads((tmp_path / "rescored" / "summary.json").read_text()) == summary


def test_text_suite_on_the_tiny_text_model(tiny_text_dir, fixture_root, tmp_path, capsys):
    out = tmp_path / "run"
    summary = run(tiny_text_dir, TEXT, fixture_root, out, "--samples", "2")
    assert set(summary) == set(TEXT.split(","))
    for s in summary.values():
        assert s["metrics"]["samples"] == 2 and s["metrics"]["n_errors"] == 0
    rec = json.loads((out / "math500" / "predictions.jsonl").read_text().splitlines()[0])
    assert "Please reason step by step" in rec["prompt"] and len(rec["responses"]) == 2
    assert_rescoring_reproduces(summary, fixture_root, out, tmp_path)
    assert "| math500 | avg@2 |" in capsys.readouterr().out

    # Interrupted after one item, then resumed: the same samples (seeded per item, not per
    # batch) and the same summary as the uninterrupted run.
    b = tmp_path / "resumed"
    run(tiny_text_dir, "aime24", fixture_root, b, "--samples", "2", "--limit", "1")
    resumed = run(tiny_text_dir, "aime24", fixture_root, b, "--samples", "2")
    assert resumed["aime24"] == summary["aime24"]

    def responses(d):
        lines = (d / "aime24" / "predictions.jsonl").read_text().splitlines()
        return [json.loads(x)["responses"] for x in lines]

    assert responses(b) == responses(out)


def test_vl_suite_on_a_tiny_vl_model(tiny_cache, fixture_root, tmp_path):
    pytest.importorskip("opsd_mm.model.tiny.vl")
    pytest.importorskip("opsd_mm.processors.vl")
    from opsd_mm.model.tiny import resolve_tiny

    model = resolve_tiny("qwen2-vl", tiny_cache)
    out = tmp_path / "run"
    summary = run(model, VL, fixture_root, out, "--batch-size", "4")
    assert set(summary) == set(VL.split(","))
    errors = {n: s["metrics"]["n_errors"] for n, s in summary.items()}
    assert errors == {"mmmu": 1, "mathvista": 1, "mathvision": 0, "wemath": 0, "zerobench": 0}
    recs = [json.loads(x) for x in (out / "mmmu" / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["error"] is not None for r in recs) == 1 and len(recs) == 5
    assert_rescoring_reproduces(summary, fixture_root, out, tmp_path)
