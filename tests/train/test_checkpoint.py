import json

import pytest
import torch

from opsd_mm.train import checkpoint as ckpt


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path / "model.safetensors"))


def _parts():
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_save_load_round_trip_and_prune(tmp_path):
    model, opt, sched = _parts()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(
            tmp_path,
            step,
            model=model,
            optimizer=opt,
            scheduler=sched,
            state={"data": {"consumed": step}},
            keep_last=2,
        )
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000003"]
    fresh, opt2, sched2 = _parts()
    with torch.no_grad():
        fresh.lin.weight.zero_()
    state, teacher = ckpt.load_checkpoint(
        ckpt.latest_checkpoint(tmp_path), model=fresh, optimizer=opt2, scheduler=sched2
    )
    assert state["step"] == 3 and state["data"] == {"consumed": 3} and teacher is None
    assert torch.equal(fresh.lin.weight, model.lin.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
    model, opt, sched = _parts()
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={})
    partial = ckpt.checkpoint_dir(tmp_path) / ".tmp-step-000002-999"
    (partial / "model").mkdir(parents=True)
    # A directory with the final name but no state.json is not complete either.
    (ckpt.checkpoint_dir(tmp_path) / "step-000003").mkdir()
    # Nor is a user's copy beside the checkpoints (it must not break their ordering).
    copy = ckpt.checkpoint_dir(tmp_path) / "step-000001.bak"
    copy.mkdir()
    (copy / "state.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state={})
    assert not partial.exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"


def test_rng_state_restored(tmp_path):
    model, opt, sched = _parts()
    torch.manual_seed(7)
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={})
    after_save = torch.rand(4)
    torch.manual_seed(99)
    ckpt.load_checkpoint(
        ckpt.latest_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=sched
    )
    assert torch.equal(torch.rand(4), after_save)


def test_teacher_state_and_mismatch_errors(tmp_path):
    model, opt, sched = _parts()
    ckpt.save_checkpoint(
        tmp_path,
        1,
        model=model,
        optimizer=opt,
        scheduler=sched,
        state={},
        teacher_state={"w": torch.ones(2)},
    )
    path = ckpt.latest_checkpoint(tmp_path)
    _, teacher = ckpt.load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert torch.equal(teacher["w"], torch.ones(2))
    other = torch.nn.Linear(5, 5)
    with pytest.raises(RuntimeError, match="does not match"):
        ckpt.load_model_weights(other, path / "model")
    assert json.loads((path / "state.json").read_text())["step"] == 1
