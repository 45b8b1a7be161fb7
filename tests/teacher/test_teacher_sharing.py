"""A fixed teacher under full fine-tuning shares every frozen module with the student.

The teacher keeps only the initial values of the trainable parameters and swaps them into the
student for its forward (``opsd_mm/teacher/weights.py``). Checked here on the tiny Qwen2.5-VL with the
vision tower and projector frozen (``model.train_vision_tower`` / ``model.train_projector``
false), full fine-tuning of the language model: the losses equal those of a teacher that is a
deep copy of the initial model (the former implementation, kept here as the reference), and
the teacher holds no second copy of the vision tower (bytes counted from distinct storages).
The 2-process DDP and FSDP2 counterparts are in ``tests/train/test_distributed.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from opsd_mm.cli import build_trainer
from opsd_mm.config import load_config
from opsd_mm.teacher.weights import Teacher
from opsd_mm.testing.memory import storage_bytes, tensors_in

TINY_VL = Path(__file__).resolve().parents[2] / "configs" / "tiny_vl.yaml"


def _trainer(tiny_cache, run_dir, *extra):
    overrides = [
        f"run_dir={run_dir}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        "model.lora.enabled=false",
        "model.train_vision_tower=false",
        "model.train_projector=false",
        "trainer.save_every=0",
        "trainer.max_steps=2",
        *extra,
    ]
    return build_trainer(load_config(TINY_VL, overrides))


class DeepCopyTeacher(Teacher):
    """The reference: a frozen deep copy of the whole initial model, run in eval mode."""

    def __init__(self, cfg, model: torch.nn.Module) -> None:
        self.cfg = cfg
        self.weights = {}
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @contextmanager
    def as_teacher(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        yield self.frozen

    def head_weight(self, param):
        return param


def test_fixed_teacher_swap_matches_a_deep_copy(tiny_cache, tmp_path):
    ours = _trainer(tiny_cache, tmp_path / "ours")
    ref = _trainer(tiny_cache, tmp_path / "ref")
    ref.teacher = DeepCopyTeacher(ref.cfg.teacher, ref.model)
    got, want = ours.train(), ref.train()
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # exactly (CPU, fp32)
    assert all(m["loss"] > 0 for m in got)
    for (n, p), (_, q) in zip(ours.model.named_parameters(), ref.model.named_parameters()):
        assert torch.equal(p, q), n


def test_fixed_teacher_holds_no_copy_of_the_frozen_vision_tower(tiny_cache, tmp_path):
    trainer = _trainer(tiny_cache, tmp_path, "trainer.max_steps=1")
    trainer.train()
    params = dict(trainer.model.named_parameters())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert any(".visual." in n and "merger" not in n for n in frozen)  # the vision tower
    assert any(".visual.merger" in n for n in frozen)  # the projector
    student = storage_bytes(params.values())
    with_teacher = storage_bytes([*params.values(), *tensors_in(trainer.teacher)])
    trainable = storage_bytes(p for p in params.values() if p.requires_grad)
    frozen_bytes = storage_bytes(params[n] for n in frozen)
    assert frozen_bytes > 0.2 * student  # large enough that a copy would show
    # The teacher adds exactly one copy of the trainable parameters, nothing of the frozen ones.
    assert with_teacher - student == trainable
    assert not set(frozen) & trainer.teacher.weights.keys()
    # A deep copy (the reference) would add every parameter again.
    ref = DeepCopyTeacher(trainer.cfg.teacher, trainer.model)
    assert storage_bytes([*params.values(), *tensors_in(ref)]) - student >= student
