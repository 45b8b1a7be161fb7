"""``opsd-mm eval`` / ``opsd-mm eval score`` argument handling (the core CLI mounts these)."""

from __future__ import annotations

import argparse
import json

import pytest

from opsd_mm.eval.benchmarks._common import EvalError
from opsd_mm.eval.cli import Runtime, add_eval_parser, main_eval


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsd-mm")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.parametrize("argv", [["eval", "--help"], ["eval", "score", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert ("--benchmarks" in out) if len(argv) == 2 else ("--predictions" in out)


def test_eval_then_score_reproduces_the_summary(
    fixture_root, plain_processor, make_engine, tmp_path, capsys
):
    engine = make_engine()
    out = tmp_path / "run"
    args = parser().parse_args(
        [
            "eval",
            "--model",
            "tiny",
            "--benchmarks",
            "mmmu,aime24,zerobench",
            "--data-dir",
            str(fixture_root),
            "--output",
            str(out),
            "--limit",
            "3",
            "--max-new-tokens",
            "32",
            "--no-progress",
        ]
    )
    assert args.func is main_eval
    seen = {}

    def factory(a):
        seen["model"] = a.model
        return Runtime(engine, plain_processor, engine.decode)

    assert main_eval(args, runtime_factory=factory) == 0
    assert seen == {"model": "tiny"}
    assert "| mmmu | accuracy |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"mmmu", "aime24", "zerobench"}
    assert json.loads((out / "aime24" / "run.json").read_text())["sampling"]["max_new_tokens"] == 32

    args = parser().parse_args(
        [
            "eval",
            "score",
            "--benchmark",
            "mmmu",
            "--predictions",
            str(out / "mmmu" / "predictions.jsonl"),
            "--data-dir",
            str(fixture_root),
            "--output",
            str(tmp_path / "scored"),
        ]
    )
    assert main_eval(args) == 0
    rescored = json.loads((tmp_path / "scored" / "summary.json").read_text())
    assert rescored["mmmu"] == summary["mmmu"]


def test_model_is_required_and_names_are_checked(tmp_path):
    args = parser().parse_args(["eval", "--benchmarks", "mmmu"])
    with pytest.raises(EvalError, match="--model"):
        main_eval(args)
    args = parser().parse_args(
        ["eval", "--model", "m", "--benchmarks", "nope", "--output", str(tmp_path)]
    )
    with pytest.raises(EvalError, match="--benchmarks: unknown benchmark"):
        main_eval(args, runtime_factory=lambda a: None)
