"""The reward path in the trainer (loss.reward_weight, loss.distill_weight) on the tiny text
model: the hybrid's gradient is the sum of the GRPO and OPSD terms' gradients, on the naive and
the fused path; reward metrics; config checks."""

from pathlib import Path

import pytest
import torch

from opsd_mm import cli
from opsd_mm.cli import build_trainer
from opsd_mm.config import ConfigError, load_config
from opsd_mm.errors import UserError
from opsd_mm.loss.rewards import RewardScore

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_text.yaml"


class LengthReward:
    """Deterministic and almost never constant within a group: the completion's length."""

    name = "length"

    def __init__(self):
        self.calls = 0

    def __call__(self, examples, completions):
        self.calls += 1
        return [RewardScore(len(c) / 50.0) for c in completions]


class ConstantReward:
    name = "constant"

    def __call__(self, examples, completions):
        return [RewardScore(1.0) for _ in completions]


def _cfg(tiny_cache, run_dir, *extra):
    return load_config(
        TINY,
        [
            f"run_dir={run_dir}",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
            "trainer.save_every=0",
            "trainer.max_steps=1",
            "rollout.n=3",
            "loss.chunk_size=7",
            *extra,
        ],
    )


def _step(cfg, monkeypatch, reward):
    monkeypatch.setattr(cli, "build_reward", lambda cfg: reward if cfg.loss.reward_weight else None)
    trainer = build_trainer(cfg)
    grads = {}
    real_clip = trainer._clip_grad_norm

    def capture():
        grads.update(
            {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        )
        return real_clip()

    trainer._clip_grad_norm = capture
    return trainer.train_step(), grads


def test_hybrid_gradient_is_sum_of_terms(tiny_cache, tmp_path, tiny_text_dir, monkeypatch):
    runs = {}
    for name, fused, rw, dw in [
        ("hybrid", False, 0.3, 0.7),
        ("grpo", False, 0.3, 0.0),
        ("opsd", False, 0.0, 0.7),
        ("hybrid_fused", True, 0.3, 0.7),
    ]:
        cfg = _cfg(
            tiny_cache,
            tmp_path / name,
            f"loss.fused={str(fused).lower()}",
            f"loss.reward_weight={rw}",
            f"loss.distill_weight={dw}",
        )
        runs[name] = _step(cfg, monkeypatch, LengthReward())
    (m_h, g_h), (m_g, g_g), (m_o, g_o), (m_f, g_f) = runs.values()
    assert m_h["reward/zero_variance_groups"] < 1  # the PG term is not trivially zero
    assert m_h["loss/reward_pg"] != 0
    assert m_h["loss/distill"] == pytest.approx(m_o["loss"], rel=1e-5)
    assert m_h["loss/reward_pg"] == pytest.approx(m_g["loss"], rel=1e-5, abs=1e-7)
    assert m_h["loss"] == pytest.approx(m_g["loss"] + m_o["loss"], rel=1e-5)
    assert "reward/mean" not in m_o  # pure OPSD computes no reward
    assert g_h.keys() == g_g.keys() == g_o.keys() == g_f.keys()
    for n in g_h:
        assert torch.allclose(g_h[n], g_g[n] + g_o[n], rtol=1e-4, atol=1e-8), n
        assert torch.allclose(g_f[n], g_h[n], rtol=1e-4, atol=1e-8), n  # fused == naive


def test_constant_reward_gives_zero_pg_and_counts_groups(
    tiny_cache, tmp_path, tiny_text_dir, monkeypatch
):
    cfg = _cfg(tiny_cache, tmp_path, "loss.reward_weight=1.0", "loss.distill_weight=0")
    metrics, grads = _step(cfg, monkeypatch, ConstantReward())
    assert metrics["reward/mean"] == 1.0
    assert metrics["reward/zero_variance_groups"] == 1.0
    assert metrics["loss/reward_pg"] == 0.0 and metrics["loss"] == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())
    assert metrics["reward_timeouts"] == 0 and metrics["reward_failures"] == 0
    assert "time/reward" in metrics


@pytest.mark.parametrize(
    "extra, key",
    [
        (["loss.reward_weight=-1"], "loss.reward_weight"),
        (["loss.distill_weight=0"], "loss.distill_weight"),
        (["loss.reward_weight=1", "rollout.n=1"], "rollout.n"),
        (["loss.reward_weight=1", "loss.reward_timeout=0"], "loss.reward_timeout"),
    ],
)
def test_reward_config_checks(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TINY, [f"run_dir={tmp_path}", *extra])


def test_reward_weight_without_reward_is_an_error(tiny_cache, tmp_path, tiny_text_dir, monkeypatch):
    monkeypatch.setattr(cli, "build_reward", lambda cfg: None)
    with pytest.raises(UserError, match="loss.reward_weight"):
        build_trainer(_cfg(tiny_cache, tmp_path, "loss.reward_weight=1"))


def test_plain_grpo_runs_no_teacher_forward(tiny_cache, tmp_path, tiny_text_dir, monkeypatch):
    """loss.distill_weight=0: the teacher's term weighs nothing, so its forward is skipped
    (naive and fused paths); the divergence statistics are then undefined (NaN), not 0."""
    for fused in ("false", "true"):
        cfg = _cfg(
            tiny_cache,
            tmp_path / fused,
            f"loss.fused={fused}",
            "loss.reward_weight=1.0",
            "loss.distill_weight=0",
        )
        monkeypatch.setattr(cli, "build_reward", lambda cfg: LengthReward())
        trainer = build_trainer(cfg)

        def no_teacher(model):
            raise AssertionError("the teacher ran with loss.distill_weight=0")

        trainer.teacher.as_teacher = no_teacher
        metrics = trainer.train_step()
        assert metrics["loss/reward_pg"] != 0 and metrics["loss/distill"] == 0
        assert "time/teacher" not in metrics
        assert metrics["divergence_mean"] != metrics["divergence_mean"]  # NaN
