"""Run safety on the tiny text model (CPU, fp32): a used run_dir is refused, resume applies a
changed lr/batch with a warning, a corrupt newest checkpoint falls back to the previous one,
steps without usable completions are bad steps, skips are counted by reason, and
``processor.bad_image_policy=raise`` holds at run time. The kill -9 / SIGTERM scenarios are in
tests/train/test_crash_resume.py."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from opsd_mm.cli import build_trainer, main
from opsd_mm.config import load_config
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train import trainer as trainer_mod
from opsd_mm.train.metrics import read_metrics
from opsd_mm.types import BadImageError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_text.yaml"


def _args(tiny_cache, run_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        "rollout.max_new_tokens=8",
        *extra,
    ]


def _trainer(tiny_cache, run_dir, *extra):
    return build_trainer(load_config(TINY, _args(tiny_cache, run_dir, *extra)))


def test_fresh_run_refuses_used_run_dir(tiny_cache, tmp_path, tiny_text_dir, capsys):
    run = tmp_path / "run"
    argv = ["train", str(TINY), *_args(tiny_cache, run, "trainer.max_steps=1")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2  # the same command again: a fresh run into a used directory
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"run_dir={run}" in err and "--resume" in err and "--overwrite" in err
    # The in-process API refuses too (before anything is written).
    with pytest.raises(Exception, match="already holds another run"):
        _trainer(tiny_cache, run, "trainer.max_steps=1").train()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    # --overwrite moves the old run aside, whole, and starts afresh.
    assert main([*argv, "--overwrite"]) == 0
    (old,) = tmp_path.glob("run.replaced-*")
    assert (old / "metrics.jsonl").exists() and ckpt.list_checkpoints(old)
    assert (old / "run.json").read_text() != (run / "run.json").read_text()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]


def _save(tmp_path, run_id, steps, keep_last=2):
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path, safe_serialization=True: (
        path.mkdir(parents=True),
        torch.save({}, path / "x.pt"),
    )
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in steps:
        ckpt.save_checkpoint(
            tmp_path, step, model=model, optimizer=opt, scheduler=sched, state={},
            keep_last=keep_last, run_id=run_id,
        )  # fmt: skip


def test_pruning_removes_only_the_current_runs_checkpoints(tmp_path):
    _save(tmp_path, "old", [7, 8])
    _save(tmp_path, "new", [1, 2, 3])
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000003", "step-000007", "step-000008"]
    assert [ckpt.checkpoint_run_id(p) for p in ckpt.list_checkpoints(tmp_path)] == [
        "new",
        "new",
        "old",
        "old",
    ]


def test_resume_applies_changed_lr_and_batch_with_a_warning(
    tiny_cache, tmp_path, tiny_text_dir, caplog
):
    _trainer(tiny_cache, tmp_path, "trainer.max_steps=2", "trainer.save_every=1").train()
    resumed = _trainer(
        tiny_cache,
        tmp_path,
        "trainer.max_steps=3",
        "trainer.resume=true",
        "trainer.lr=5e-3",
        "trainer.batch_size=3",
    )
    with caplog.at_level(logging.WARNING, logger="opsd_mm.train.trainer"):
        resumed.resume()
    assert resumed.step == 2
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [5e-3]
    text = caplog.text
    assert "trainer.lr changed from 0.001 (checkpoint) to 0.005 (config)" in text
    assert "trainer.batch_size x processes) changed from 2 (checkpoint) to 3 (config)" in text
    # The documented batch rule: the data continues after the last consumed example.
    assert resumed.stream.state() == {"consumed": 4}  # 2 steps x 2 examples
    (m,) = resumed.train()
    assert m["step"] == 3 and m["lr"] == 5e-3


@pytest.mark.parametrize("damage", ["weights", "state_json"])
def test_corrupt_newest_checkpoint_falls_back(tiny_cache, tmp_path, tiny_text_dir, caplog, damage):
    extra = ("trainer.save_every=1", "trainer.keep_last=3")
    full = _trainer(tiny_cache, tmp_path / "full", "trainer.max_steps=3", *extra).train()
    run = tmp_path / "run"
    _trainer(tiny_cache, run, "trainer.max_steps=3", *extra).train()
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == "step-000003"
    if damage == "weights":
        (weights,) = (newest / "model").glob("*.safetensors")
        weights.write_bytes(weights.read_bytes()[:100])  # truncated
    else:
        (newest / "state.json").write_text('{"step": 3, "data": {')  # garbled
    resumed = _trainer(tiny_cache, run, "trainer.max_steps=3", "trainer.resume=true", *extra)
    with caplog.at_level(logging.WARNING, logger="opsd_mm.train.trainer"):
        rest = resumed.train()
    assert "step-000003 cannot be loaded" in caplog.text
    assert "previous complete checkpoint" in caplog.text and "step-000002" in caplog.text
    assert [m["step"] for m in rest] == [3]
    assert rest[0]["loss"] == full[2]["loss"]  # continues exactly from step 2
    assert (ckpt.checkpoint_dir(run) / "corrupt-step-000003").is_dir()  # kept for inspection
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_steps_without_usable_completions_are_bad_steps(tiny_cache, tmp_path, tiny_text_dir):
    trainer = _trainer(
        tiny_cache,
        tmp_path,
        "trainer.max_steps=5",
        "trainer.save_every=0",
        "trainer.max_bad_steps_in_row=2",
    )

    def reject(ex, completion_ids, **kwargs):
        raise ValueError(f"completion of {ex.id} rejected (test)")

    trainer.processor.pair = reject
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(trainer_mod.BadStepsError, match="max_bad_steps_in_row=2"):
        trainer.train()
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["skipped"] is True and row["loss"] is None  # not 0.0
    assert row["empty_steps"] == 1 and row["rejected_completions"] == 4
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_diverged_model_aborts_on_bad_steps(tiny_cache, tmp_path, tiny_text_dir):
    """lr=1e30: the first step blows the weights up; every later step is bad (non-finite, or
    no usable completion), and the run stops instead of "succeeding"."""
    trainer = _trainer(
        tiny_cache,
        tmp_path,
        "trainer.max_steps=8",
        "trainer.save_every=0",
        "trainer.lr=1e30",
        "trainer.max_bad_steps_in_row=2",
        "model.lora.enabled=false",
    )
    with pytest.raises(trainer_mod.BadStepsError, match="bad steps in a row"):
        trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["skipped"] and rows[-1]["loss"] is None


def test_skips_counted_by_reason_in_metrics(tiny_cache, tmp_path, tiny_text_dir):
    """A bad row and a missing image at load, a bad image at run time: counters by reason."""
    (tmp_path / "ok.png").write_bytes(b"")  # exists; the text model never opens it
    rows = [{"problem": f"{i}+1?", "solution": f"{i}+1={i + 1}", "img": "ok.png"} for i in range(6)]
    rows += [{"problem": "", "solution": "x", "img": "ok.png"}]  # bad row: missing question
    rows += [{"problem": "9+1?", "solution": "10", "img": "gone.png"}]  # missing image
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = _trainer(
        tiny_cache,
        tmp_path / "run",
        f"data.source={data}",
        "data.columns.images=img",
        "trainer.max_steps=2",
        "trainer.save_every=0",
        "data.shuffle=false",
    )
    real = trainer.processor.student_prompt

    def flaky(ex):
        if ex.id == "row-1":
            raise BadImageError(ex.id, "ok.png", "corrupt image data (test)")
        return real(ex)

    trainer.processor.student_prompt = flaky
    trainer.train()
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["skipped/load/missing_question"] == 1
    assert last["skipped/load/image_not_found"] == 1
    assert last["skipped/run/bad_image"] == 1 and last["bad_examples"] == 1


def test_bad_image_policy_raise_holds_at_run_time(tiny_cache, tmp_path, tiny_text_dir):
    for policy in ("skip", "raise"):
        trainer = _trainer(
            tiny_cache,
            tmp_path / policy,
            f"processor.bad_image_policy={policy}",
            "trainer.save_every=0",
        )

        def bad(ex):
            raise BadImageError(ex.id, "a.png", "file not found")

        trainer.processor.student_prompt = bad
        trainer.processor.pair = lambda *a, **k: (_ for _ in ()).throw(AssertionError)
        if policy == "raise":
            with pytest.raises(BadImageError, match="bad image a.png"):
                trainer.train_step()
        else:
            m = trainer.train_step()
            assert m["skipped/run/bad_image"] == 2 and m["skipped"]
            assert math.isnan(m["loss"])
