"""A separate teacher scored on its own ``opsd-mm serve`` (teacher.kind=model
teacher.scoring=server teacher.server_url): the same losses as the local teacher forward.

The trainer runs in the main environment with the hf rollout engine (the same seeded rollouts
in both runs); the teacher, tiny:text-teacher, is served by vLLM's CPU build on loopback and
only ever asked to ``score``. Tolerance rel 1e-3: vLLM's and transformers' fp32 forwards of
the same weights differ in float rounding (as in test_vllm_teacher_scoring.py).
"""

from __future__ import annotations

import math
import subprocess

import pytest

from opsd_mm.testing.server import ServerProcess, server_env
from opsd_mm.train.metrics import read_metrics

from .conftest import ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _train(main_python, run_dir, tiny_cache, *extra):
    cmd = [
        str(main_python),
        "-m",
        "opsd_mm.cli",
        "train",
        str(ROOT / "configs" / "tiny_text.yaml"),
        f"run_dir={run_dir}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        "trainer.max_steps=3",
        "trainer.save_every=0",
        "rollout.engine=hf",
        "teacher.kind=model",
        "teacher.model.name_or_path=tiny:text-teacher",
        "loss.temperature=1.0",
        *extra,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=server_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize(
    "loss",
    [["loss.divergence=sampled_pg"], ["loss.divergence=jsd", "loss.top_k=8"]],
    ids=["sampled_pg", "jsd-topk"],
)
def test_served_model_teacher_matches_the_local_one(tiny_cache, tmp_path, main_python, loss):
    from opsd_mm.model.tiny import resolve_tiny

    srv = ServerProcess(resolve_tiny("text-teacher", tiny_cache))
    srv.start()
    try:
        local = _train(main_python, tmp_path / "local", tiny_cache, *loss)
        served = _train(
            main_python,
            tmp_path / "server",
            tiny_cache,
            *loss,
            "teacher.scoring=server",
            f"teacher.server_url={srv.url}",
        )
    finally:
        srv.stop()
    assert [r["step"] for r in served] == [1, 2, 3]
    for a, b in zip(local, served):
        assert a["completion_len_mean"] == b["completion_len_mean"]  # the same rollouts
        assert math.isfinite(b["loss"]) and b["loss"] != 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-7), (a["loss"], b["loss"])
        assert b["divergence_mean"] == pytest.approx(a["divergence_mean"], rel=1e-3, abs=1e-6)
        assert b["teacher/teacher/rows"] == a["teacher/teacher/rows"] > 0
        assert "time/teacher_score" in b and "time/teacher" not in b
        assert b["memory/teacher_weights_gib"] == 0 < a["memory/teacher_weights_gib"]
    print(
        "loss local:",
        [round(r["loss"], 6) for r in local],
        "served:",
        [round(r["loss"], 6) for r in served],
    )
