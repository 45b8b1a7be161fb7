"""Runner bookkeeping with a scripted engine: outputs, resume after a kill, errors for broken
rows, and re-scoring saved predictions into identical summaries."""

from __future__ import annotations

import json

import pytest

from opsd_mm.eval.records import read_records
from opsd_mm.eval.registry import list_benchmarks
from opsd_mm.eval.runner import run_eval, score_predictions


def run(engine, processor, root, out, names, **kw):
    return run_eval(
        names, engine, processor, out, decode=engine.decode, data_dir=root, progress=False, **kw
    )


def test_outputs_and_missing_image_row(
    fixture_root, plain_processor, make_engine, canned_script, tmp_path
):
    canned = canned_script
    engine = make_engine()
    summaries = run(engine, plain_processor, fixture_root, tmp_path, ["mmmu"], batch_size=2)
    recs = [
        json.loads(x) for x in (tmp_path / "mmmu" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in recs] == [
        "validation_Math_1",
        "validation_Art_Theory_2",
        "validation_Physics_3",
        "validation_Economics_4",
        "validation_Biology_5",
    ]
    bad = recs[-1]
    assert "missing image" in bad["error"] and bad["scores"] == [] and bad["correct"] is False
    assert len(engine.prompts_seen) == 4  # the broken row was never generated; the run went on
    first = recs[0]
    assert first["prompt"].endswith("given choices directly.")
    assert (first["response"], first["extracted"], first["rule"], first["correct"]) == (
        canned("mmmu", "validation_Math_1", 0),
        "B",
        "bracket",
        True,
    )
    m = summaries["mmmu"]["metrics"]
    assert m["n"] == 5 and m["n_errors"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)  # the error counts as wrong
    assert summaries["mmmu"]["headline"] == {"accuracy": m["accuracy"]}
    assert json.loads((tmp_path / "summary.json").read_text())["mmmu"] == summaries["mmmu"]
    table = (tmp_path / "summary.md").read_text()
    assert "| mmmu | accuracy | 60.00 | 5 | 1 | 0 |" in table


def test_resume_after_kill_generates_only_the_rest(
    fixture_root, plain_processor, make_engine, tmp_path
):
    names = ["mmmu", "aime24"]
    full = run(make_engine(), plain_processor, fixture_root, tmp_path / "full", names, batch_size=2)

    out = tmp_path / "killed"
    killed = make_engine(fail_after=1)  # dies on its second generate call
    with pytest.raises(KeyboardInterrupt):
        run(killed, plain_processor, fixture_root, out, names, batch_size=2)
    assert len(read_records(out / "mmmu" / "predictions.jsonl")) == 2
    # A kill can also tear the last line mid-write: it is dropped and regenerated.
    with (out / "mmmu" / "predictions.jsonl").open("a") as f:
        f.write('{"id": "validation_Physics_3", "prom')

    again = make_engine()
    resumed = run(again, plain_processor, fixture_root, out, names, batch_size=2)
    assert again.prompts_seen == [
        "validation_Physics_3",
        "validation_Economics_4",
        "60",
        "61",
        "62",
    ]
    assert resumed == full
    for name in names:
        assert (out / name / "summary.json").read_text() == (
            tmp_path / "full" / name / "summary.json"
        ).read_text()


def test_resume_refuses_different_settings(fixture_root, plain_processor, make_engine, tmp_path):
    run(make_engine(), plain_processor, fixture_root, tmp_path, ["aime24"])
    with pytest.raises(ValueError, match="samples"):
        run(make_engine(), plain_processor, fixture_root, tmp_path, ["aime24"], samples=2)


def test_samples_limit_and_sampling(fixture_root, plain_processor, make_engine, tmp_path):
    seen = []
    engine = make_engine()
    generate = engine.generate

    def recording(prompts, n, sampling):
        seen.append((len(prompts), n, sampling))
        return generate(prompts, n, sampling)

    engine.generate = recording
    s = run(
        engine, plain_processor, fixture_root, tmp_path, ["zerobench"], samples=5, limit=2, seed=3
    )
    _, n, sampling = seen[0]
    assert n == 5 and (sampling.temperature, sampling.top_p, sampling.seed) == (0.7, 0.95, 3)
    m = s["zerobench"]["metrics"]
    assert m["n"] == 2 and m["samples"] == 5
    assert m["pass@5"] == 0.5 and m["5/5"] == 0.0 and m["avg@5"] == pytest.approx(3 / 10)
    assert set(s["zerobench"]["headline"]) == {"pass@5", "5/5", "avg@5"}
    s = run(
        engine,
        plain_processor,
        fixture_root,
        tmp_path / "b",
        ["aime24"],
        sampling={"max_new_tokens": 64},
    )
    assert (seen[-1][2].temperature, seen[-1][2].max_new_tokens) == (0.0, 64)


def test_score_predictions_reproduces_every_summary(
    fixture_root, plain_processor, make_engine, tmp_path
):
    names = list_benchmarks()
    engine = make_engine()
    summaries = run(engine, plain_processor, fixture_root, tmp_path / "run", names, samples=2)
    for name in names:
        preds = tmp_path / "run" / name / "predictions.jsonl"
        rescored = score_predictions(name, preds, fixture_root, tmp_path / "rescored")
        assert rescored == summaries[name], name
    assert json.loads((tmp_path / "rescored" / "summary.json").read_text()) == summaries
    assert (tmp_path / "rescored" / "summary.md").read_text() == (
        tmp_path / "run" / "summary.md"
    ).read_text()


def test_score_predictions_minimal_format(fixture_root, tmp_path):
    preds = tmp_path / "preds.jsonl"
    lines = [
        {"id": "validation_Physics_3", "response": "The answer is 12.97"},
        {"id": "validation_Math_1", "responses": ["(A)", "(B)"]},
    ]
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = score_predictions("mmmu", preds, fixture_root, tmp_path / "out")
    assert s["metrics"]["n"] == 2 and s["metrics"]["accuracy"] == pytest.approx(0.5)
    recs = read_records(tmp_path / "out" / "mmmu" / "predictions.jsonl")
    assert list(recs) == ["validation_Math_1", "validation_Physics_3"]  # dataset order
    preds.write_text(json.dumps({"id": "validation_Nope_9", "response": "x"}) + "\n")
    with pytest.raises(ValueError, match="validation_Nope_9"):
        score_predictions("mmmu", preds, fixture_root, tmp_path / "out2")
