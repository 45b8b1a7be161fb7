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

import pytest
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


# The swapped-in teacher and the deep copy are two computations of the same math on other
# tensors in another module, not a repeat: on some CPUs their kernels round differently (6e-7
# relative in the loss on an AVX-512 Xeon). fp32 on a CPU agrees far inside these tolerances;
# a teacher that is not the initial model (a broken swap) is off by percents from step 2 on.
LOSS_RTOL = 1e-5
# AdamW's first steps move each weight by up to lr (1e-3) whatever its gradient's size, so an
# entry whose gradient is near 0 can move differently by a small fraction of lr.
WEIGHT_ATOL = 1e-5


def test_fixed_teacher_swap_matches_a_deep_copy(tiny_cache, tmp_path):
    ours = _trainer(tiny_cache, tmp_path / "ours")
    ref = _trainer(tiny_cache, tmp_path / "ref")
    ref.teacher = DeepCopyTeacher(ref.cfg.teacher, ref.model)
    got, want = ours.train(), ref.train()
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=LOSS_RTOL)
    assert all(m["loss"] > 0 for m in got)
    for (n, p), (_, q) in zip(ours.model.named_parameters(), ref.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=WEIGHT_ATOL, msg=n)


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
