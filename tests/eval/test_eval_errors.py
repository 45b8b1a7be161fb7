"""Eval failures that used to be silent, tracebacks or crashes: bad flags, missing copies
found late, stale scores on resume, records without ids, MathVista overflow."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from opsd_mm import cli
from opsd_mm.eval.benchmarks._common import EvalError
from opsd_mm.eval.cli import add_eval_parser, main_eval
from opsd_mm.eval.records import read_records
from opsd_mm.eval.registry import get_benchmark
from opsd_mm.eval.runner import run_eval, score_predictions

OVERFLOWING = ("inf", "1e400", "-infinity", "-1e400", "\\boxed{1e400}", "The answer is inf")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opsd-mm")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["eval", *argv])


def no_model(_args):
    raise AssertionError("the model must not load")


@pytest.mark.parametrize(
    "flag, value", [("--limit", "0"), ("--limit", "-3"), ("--batch-size", "0"), ("--samples", "0")]
)
def test_bad_counts_fail_before_the_model_loads(flag, value, fixture_root, tmp_path, capsys):
    argv = ["--model", "m", "--benchmarks", "aime24", "--data-dir", str(fixture_root)]
    args = parse(*argv, "--output", str(tmp_path), flag, value)
    with pytest.raises(EvalError, match=f"^{flag} {value}: must be >= 1"):
        main_eval(args, runtime_factory=no_model)
    # Through the command line: one line, exit 2.
    assert cli.main(["eval", *argv, "--output", str(tmp_path), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"eval error: {flag} {value}: must be >= 1"]


def test_missing_copies_are_reported_before_any_generation(
    fixture_root, plain_processor, make_engine, tmp_path
):
    partial = tmp_path / "copies"
    shutil.copytree(fixture_root / "aime24", partial / "aime24")
    engine = make_engine()
    with pytest.raises(EvalError) as e:
        run_eval(
            ["aime24", "mmmu", "math500"], engine, plain_processor, tmp_path / "out",
            decode=engine.decode, data_dir=partial, progress=False,
        )  # fmt: skip
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"no local copy of benchmark 'mmmu' at {partial / 'mmmu'}")
    assert lines[1].startswith(f"no local copy of benchmark 'math500' at {partial / 'math500'}")
    assert engine.prompts_seen == []  # aime24, first in line, was not generated either
    args = parse("--model", "m", "--benchmarks", "aime24,mmmu", "--data-dir", str(partial))
    with pytest.raises(EvalError, match="'mmmu'"):
        main_eval(args, runtime_factory=no_model)


def test_resume_rescores_stored_responses(fixture_root, plain_processor, make_engine, tmp_path):
    def run(out):
        engine = make_engine()
        kw = dict(decode=engine.decode, data_dir=fixture_root, progress=False)
        return run_eval(["aime24"], engine, plain_processor, out, **kw), engine

    full, _ = run(tmp_path / "out")
    preds = tmp_path / "out" / "aime24" / "predictions.jsonl"
    recs = [json.loads(x) for x in preds.read_text().splitlines()]
    wrong = next(r for r in recs if not r["correct"])
    wrong["correct"] = True  # a stale score, e.g. from an older, buggier scorer
    wrong["scores"][0]["correct"] = True
    preds.write_text("".join(json.dumps(r) + "\n" for r in recs))
    resumed, engine = run(tmp_path / "out")
    assert engine.prompts_seen == []  # nothing regenerated...
    assert resumed == full  # ...but the stored responses were scored again
    assert read_records(preds)[wrong["id"]]["correct"] is False


def test_records_without_id_name_the_file_and_line(fixture_root, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "60", "response": "\\\\boxed{24}"}\n{"response": "7"}\n')
    with pytest.raises(EvalError, match=rf"^{preds}, line 2: a record needs an 'id'"):
        score_predictions("aime24", preds, fixture_root, tmp_path / "s")
    with pytest.raises(EvalError, match=rf"^{preds}, line 2: a record needs an 'id'"):
        read_records(preds)  # the resume path
    preds.write_bytes(b'{"id": "60", "response": "caf\xe9"}\n{"id": "61", "response": "1"}\n')
    with pytest.raises(EvalError, match=rf"^{preds}, line 1: not UTF-8"):
        score_predictions("aime24", preds, fixture_root, tmp_path / "s")


@pytest.mark.parametrize("response", OVERFLOWING)
def test_mathvista_overflowing_numbers_score_as_wrong(fixture_root, response):
    bench = get_benchmark("mathvista")
    rows = bench.load(fixture_root)
    numeric = [r for r in rows if r["answer_type"] in ("integer", "float")]
    assert len(numeric) >= 2
    for row in numeric:  # (multiple choice maps any text to its nearest choice, officially)
        assert bench.score(row, response)["correct"] is False


def test_mathvista_overflow_in_eval_and_eval_score(
    fixture_root, plain_processor, make_engine, tmp_path
):
    engine = make_engine(script=lambda b, i, j: "1e400")
    out = tmp_path / "out"
    summary = run_eval(
        ["mathvista"], engine, plain_processor, out, decode=engine.decode,
        data_dir=fixture_root, progress=False,
    )["mathvista"]  # fmt: skip
    preds = out / "mathvista" / "predictions.jsonl"
    numeric = [r for r in read_records(preds).values() if r["meta"]["answer_type"] != "text"]
    assert len(numeric) >= 2 and not any(r["correct"] for r in numeric)
    rescored = score_predictions("mathvista", preds, fixture_root, tmp_path / "scored")
    assert rescored == summary
