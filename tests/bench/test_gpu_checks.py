"""bench/gpu_checks.sh parses, and its two prepared calls run the steps they say (DRY=1 lists
the steps and their commands without running them); the benches it calls accept its options."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_checks.sh"
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry(only: str, tmp_path) -> dict[str, str]:
    env = dict(os.environ, DRY="1", ONLY=only, OUT=str(tmp_path))
    out = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"^=== (\S+) \(limit \d+s\): (.*)$", out.stdout, re.M))


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_the_two_calls_run_issue_29s_steps(tmp_path):
    first = _dry("env kernel liger packing", tmp_path)
    assert list(first) == ["env", "install", "kernel", "liger", "packing"]
    second = _dry("env vs_trl", tmp_path)
    assert list(second) == ["env", "install", "vs_trl"]
    import divergence
    import vs_trl

    liger = first["liger"].split()[2:]  # after "python3 bench/divergence.py"
    args = divergence.parse_args(liger)
    assert args.shapes == "8192x2048,8192x4096,16384x2048,16384x4096"
    assert args.heads == ["frozen", "trainable"] and args.dtype == "bf16"
    assert divergence.contender_names(args) == ["fused", "fused-triton"]
    real = vs_trl.parse_args(second["vs_trl"].split()[2:])
    assert real.real_shape and real.contenders == ["trl", "ours"] and real.max_len == 2048
    assert "--contenders" in first["packing"] and "tests/loss/test_kernel.py" in first["kernel"]
