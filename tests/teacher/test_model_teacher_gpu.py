"""teacher.kind=model on a GPU (skipped without CUDA): the teacher in bf16 on the device, and
``teacher.model.offload``: its weights in CPU memory between forwards, the device holding the
student alone, with the losses of the resident teacher."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_mm.cli import build_trainer
from opsd_mm.config import load_config

from .conftest import TINY_TEXT

pytestmark = pytest.mark.gpu


def _trainer(tiny_cache, run_dir, *extra):
    return build_trainer(
        load_config(
            TINY_TEXT,
            [
                f"run_dir={run_dir}",
                f"model.tiny_cache_dir={tiny_cache}",
                "logging.progress=false",
                "trainer.save_every=0",
                "model.dtype=auto",
                "teacher.kind=model",
                "teacher.model.name_or_path=tiny:text-teacher",
                *extra,
            ],
        )
    )


def test_bf16_teacher_and_offload_on_cuda(tiny_cache, tmp_path):
    runs = {}
    for offload in (False, True):
        trainer = _trainer(
            tiny_cache, tmp_path / str(offload), f"teacher.model.offload={str(offload).lower()}"
        )
        teacher = trainer.teachers.models["teacher"].model
        assert next(teacher.parameters()).dtype == torch.bfloat16
        losses = []
        for _ in range(2):
            metrics = trainer.train_step()
            assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
            losses.append(metrics["loss"])
        device = next(teacher.parameters()).device.type
        runs[offload] = (losses, device, metrics["memory/teacher_weights_gib"])
    (resident, on_device, gib_resident), (offloaded, on_host, gib_offloaded) = (
        runs[False],
        runs[True],
    )
    assert on_device == "cuda" and on_host == "cpu"
    # The teacher's weights on the device between micro-batches: all of them, or none.
    assert gib_resident > 0 and gib_offloaded == 0
    # The same forwards on the same device: equal up to kernel-level nondeterminism.
    for a, b in zip(resident, offloaded):
        assert b == pytest.approx(a, rel=1e-5)
