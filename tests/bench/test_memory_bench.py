"""bench/memory_per_param.py runs 2 real processes per mode and reports what the tensors hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "memory_per_param.py"


@pytest.mark.slow
def test_memory_per_param_measures_the_modes(tmp_path, tiny_cache, tiny_text_dir):
    """fp32, every parameter trainable: 4 bytes each of parameters, gradients and teacher copy,
    8 of AdamW moments per process under DDP; half of each under FSDP2; a live teacher adds 0."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH), "--modes", "ddp_full_live", "fsdp2_full_fixed"]
    cmd += ["--tiny-cache-dir", str(tiny_cache)]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ddp_full_live" in proc.stdout and "fsdp2_full_fixed" in proc.stdout
    rows = json.loads(out.read_text())

    def per(mode, col):
        return [r[col] / r["model_params"] for r in rows[mode]]

    for rank in (0, 1):
        assert per("ddp_full_live", "params")[rank] == 4.0
        assert per("ddp_full_live", "grads")[rank] == 4.0
        assert 8.0 <= per("ddp_full_live", "optimizer")[rank] < 8.01  # + the step counters
        assert per("ddp_full_live", "teacher")[rank] == 0.0
        for col, want in (("params", 2.0), ("grads", 2.0), ("teacher", 2.0)):
            assert per("fsdp2_full_fixed", col)[rank] == pytest.approx(want, rel=0.02), col
