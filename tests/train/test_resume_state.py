"""Resume never trusts a checkpoint's ``state.json``: one that is not an object, lacks a field,
holds a field of the wrong type, or records a step other than its directory's is skipped for
the previous checkpoint like an unloadable one (warned, set aside as ``corrupt-step-*``); when
no checkpoint is usable, ``opsd-mm train --resume`` says why for each in one line, exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from opsd_mm.cli import main
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train.metrics import read_metrics
from opsd_mm.types import Rollout
from tests.fixtures.train_argv import tiny_train_argv


def _argv(tiny_cache, run_dir, *extra):
    return tiny_train_argv(tiny_cache, run_dir, "trainer.keep_last=3", *extra)


@pytest.fixture(scope="module")
def finished(tiny_cache, tiny_text_dir, tmp_path_factory):
    """A 3-step run with a checkpoint after every step; tests damage copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(_argv(tiny_cache, run)) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == [
        "step-000001",
        "step-000002",
        "step-000003",
    ]
    return run


def _copy(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def _state(run: Path, step: int) -> Path:
    return ckpt.checkpoint_dir(run) / ckpt.step_name(step) / "state.json"


def _edit(path: Path, **changes) -> None:
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


DAMAGE = {
    "a list": lambda p: p.write_text("[]"),
    "a string step": lambda p: _edit(p, step="four"),
    "another directory's step": lambda p: _edit(p, step=400),
    "a negative data position": lambda p: _edit(p, data={"consumed": -6}),
    "no data position": lambda p: _edit(p, data=None),
    "counters that are not numbers": lambda p: _edit(p, counters={"bad_examples": "many"}),
    "a malformed batch generated ahead": lambda p: _edit(p, ahead={"step": 4, "rollouts": [[7]]}),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_newest_state_json_falls_back(finished, tmp_path, tiny_cache, caplog, damage):
    run = _copy(finished, tmp_path)
    want = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    DAMAGE[damage](_state(run, 3))
    with caplog.at_level(logging.WARNING):
        assert main([*_argv(tiny_cache, run), "--resume"]) == 0
    assert "step-000003 cannot be loaded" in caplog.text and "step-000002" in caplog.text
    assert "state.json" in caplog.text
    assert (ckpt.checkpoint_dir(run) / "corrupt-step-000003").is_dir()  # kept for inspection
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["loss"] == want[2]  # step 3 again, exactly: a resume repeats it


def test_no_usable_checkpoint_is_one_line_naming_each(
    finished, tmp_path, tiny_cache, capsys, monkeypatch
):
    """...and says so before the model loads (minutes, for a real model)."""
    from opsd_mm.train import build

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the state.json files were checked")

    monkeypatch.setattr(build, "load_trainable_model", no_model)
    run = _copy(finished, tmp_path)
    DAMAGE["a list"](_state(run, 1))
    DAMAGE["a string step"](_state(run, 2))
    DAMAGE["another directory's step"](_state(run, 3))
    assert main([*_argv(tiny_cache, run), "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # The one error line, last.
    errors = [x for x in lines if x.startswith("resume error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    line = errors[0]
    assert str(ckpt.checkpoint_dir(run)) in line
    assert "step-000001: state.json holds a list, not an object" in line
    assert "step-000002: state.json: 'step' must be an integer, not 'four'" in line
    assert "step-000003: state.json: 'step' is 400 but the directory is step 3" in line
    assert "--overwrite" in line
    # Nothing is set aside or deleted when nothing loads: the user decides.
    assert [p.name for p in ckpt.list_checkpoints(run)] == [
        "step-000001",
        "step-000002",
        "step-000003",
    ]


def test_state_round_trip_and_checks():
    """The fields a checkpoint records read back as written; each kind of damage is named."""
    from opsd_mm.train.state import CheckpointState, StateError

    state = CheckpointState(
        step=4,
        run_id="r",
        consumed=8,
        counters={"bad_examples": 1},
        bad_in_row=0,
        num_processes=1,
        global_batch_size=2,
        settings={"trainer.lr": 1e-3},
        ahead=None,
    )
    raw = json.loads(json.dumps(state.to_dict()))
    assert CheckpointState.from_dict(raw, dir_step=4) == state
    # rollout.async: the batch generated ahead, for the next step.
    ahead = [[Rollout([5, 6, 2], "eos", [-0.5, -1.25, -0.1], 4), Rollout([7], "length")]]
    with_ahead = dataclasses.replace(state, ahead=(5, ahead))
    back = CheckpointState.from_dict(json.loads(json.dumps(with_ahead.to_dict())), dir_step=4)
    assert back == with_ahead and back.ahead[1][0][0].logprobs == [-0.5, -1.25, -0.1]
    # Checkpoints written before run ids, settings and bad_in_row still read.
    old = {"step": 2, "data": {"consumed": 4}, "nonfinite_in_row": 1, "global_batch_size": 2}
    read = CheckpointState.from_dict(old, dir_step=2)
    assert (read.bad_in_row, read.run_id, read.settings, read.counters) == (1, None, {}, {})
    cases = {
        "holds a list, not an object": [],
        "'step' is missing": {"data": {"consumed": 0}},
        "'step' must be an integer, not True": {**raw, "step": True},
        "'step' is 5 but the directory is step 4": {**raw, "step": 5},
        "'data' must be an object with an integer 'consumed' >= 0": {**raw, "data": [0]},
        "'counters' must map names to numbers": {**raw, "counters": {"x": None}},
        "'bad_in_row' must be an integer >= 0": {**raw, "bad_in_row": -1},
        "'settings' must be an object": {**raw, "settings": "lr"},
        "'ahead' must be an object": {**raw, "ahead": 3},
        "'ahead.step' must be the next step, 5": {**raw, "ahead": {"step": 9, "rollouts": []}},
        "'ahead.rollouts'": {**raw, "ahead": {"step": 5, "rollouts": [[{"nope": 1}]]}},
    }
    for why, bad in cases.items():
        with pytest.raises(StateError, match=why.replace("(", r"\(").replace(")", r"\)")):
            CheckpointState.from_dict(bad, dir_step=4)
