"""teacher.scoring=server, without a server: the loss from a scored teacher (top-k or sampled
token log-probs) equals the loss from the teacher's full logits, naive and fused, loss and
gradients; the per-row scores land on the right loss tokens; every config refusal."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from opsd_mm.config import ConfigError, LossConfig, load_config
from opsd_mm.loss.divergences import loss_mask, token_divergence
from opsd_mm.loss.fused import fused_divergence
from opsd_mm.teacher.scoring import scores_from_full_logprobs, teacher_logprobs
from opsd_mm.train import batches
from opsd_mm.types import Pair, Prompt, TeacherLogprobs, TeacherScores

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_text.yaml"

LOSSES = [
    dict(divergence="sampled_pg"),
    dict(divergence="sampled_pg", token_clip=0.05),
    dict(divergence="jsd", beta=0.5, top_k=5),
    dict(divergence="jsd", beta=0.1, top_k=5, top_k_tail_bucket=True),
    dict(divergence="forward_kl", top_k=7, pointwise_clip=0.01),
    dict(divergence="reverse_kl", top_k=3, top_k_tail_bucket=True, token_clip=0.2),
]
IDS = ["pg", "pg-clip", "jsd-topk", "jsd-tail", "fkl-pclip", "rkl-tail-tclip"]


def _scored(t_logits_NV: torch.Tensor, ids_N: torch.Tensor, top_k: int) -> TeacherLogprobs:
    """What a server returns for these teacher logits: full-vocab log-softmax, its top-k."""
    logp_NV = F.log_softmax(t_logits_NV.float(), dim=-1)
    token_N = logp_NV.gather(-1, ids_N[:, None]).squeeze(-1)
    if not top_k:
        return TeacherLogprobs(token_N)
    top = logp_NV.topk(top_k, dim=-1)
    return TeacherLogprobs(token_N, top.indices, top.values)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_naive_scored_teacher_equals_full_logits(loss):
    g = torch.Generator().manual_seed(0)
    N, V = 11, 37
    s_NV = (torch.randn(N, V, generator=g) * 2).requires_grad_(True)
    t_NV = torch.randn(N, V, generator=g) * 2
    ids_N = torch.randint(0, V, (N,), generator=g)
    cfg = LossConfig(temperature=1.0, **loss)
    ref = token_divergence(s_NV, t_NV, ids_N, cfg)
    (g_ref,) = torch.autograd.grad(ref.loss_N.sum(), s_NV)
    out = token_divergence(s_NV, _scored(t_NV, ids_N, cfg.top_k), ids_N, cfg)
    (g_out,) = torch.autograd.grad(out.loss_N.sum(), s_NV)
    assert ref.loss_N.abs().sum() > 0
    torch.testing.assert_close(out.loss_N, ref.loss_N, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.div_N, ref.div_N, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.clipped_N, ref.clipped_N)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-6, atol=1e-7)
    assert torch.isnan(out.teacher_entropy_N).all()  # unknown without the full distribution


@pytest.mark.parametrize("closed_form", [None, False], ids=["default", "autograd"])
@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_fused_scored_teacher_equals_local_teacher(loss, closed_form):
    """The fused path from a scored teacher: loss and gradients (hidden states and a trained
    lm_head) as the fused path with the teacher's hidden states, in odd chunks; sampled_pg by
    its closed form (default) and by autograd."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 13, 8, 41
    h_NH = torch.randn(N, H, generator=g, requires_grad=True)
    ht_NH = torch.randn(N, H, generator=g)
    w_VH = (torch.randn(V, H, generator=g) * 0.7).requires_grad_(True)
    ids_N = torch.randint(0, V, (N,), generator=g)
    cfg = LossConfig(temperature=1.0, **loss)
    ref_loss, ref = fused_divergence(h_NH, ht_NH, w_VH, ids_N, cfg, scale=0.3, chunk_size=4)
    g_ref = torch.autograd.grad(ref_loss, (h_NH, w_VH))
    with torch.no_grad():
        scored = _scored(F.linear(ht_NH, w_VH), ids_N, cfg.top_k)
    loss_, out = fused_divergence(
        h_NH,
        None,
        w_VH,
        ids_N,
        cfg,
        scale=0.3,
        chunk_size=4,
        teacher_logprobs=scored,
        closed_form=closed_form,
    )
    g_out = torch.autograd.grad(loss_, (h_NH, w_VH))
    assert ref_loss.abs() > 0
    torch.testing.assert_close(loss_, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.div_N, ref.div_N, rtol=1e-6, atol=1e-7)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_scored_teacher_refuses_what_it_lacks():
    s_NV, ids_N = torch.randn(3, 9), torch.tensor([1, 2, 3])
    scored = _scored(torch.randn(3, 9), ids_N, 0)
    with pytest.raises(ValueError, match="top-4"):
        token_divergence(s_NV, scored, ids_N, LossConfig(top_k=4))
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        token_divergence(s_NV, scored, ids_N, LossConfig(divergence="jsd"))
    with pytest.raises(ValueError, match="temperature"):
        token_divergence(s_NV, scored, ids_N, LossConfig(divergence="sampled_pg", temperature=2))


def _pair(name: str, n: int, k: int) -> Pair:
    """A pair whose teacher scores encode (row, token, entry) in their values."""
    row = int(name[1:])
    scores = TeacherScores(
        [row * 100.0 + j for j in range(n)],
        [[row * 10 + e for e in range(k)] for _ in range(n)],
        [[row * 100.0 + j + e / 10 for e in range(k)] for j in range(n)],
    )
    return Pair(name, Prompt([1]), Prompt([1]), list(range(n)), teacher_scores=scores)


def test_teacher_logprobs_follow_the_loss_mask():
    """Row b, completion token j lands where completion_ids_BC[mask_BC] puts it, after
    loss.skip_first_tokens; padding columns take nothing."""
    pairs = [_pair("r0", 4, 2), _pair("r1", 2, 2), _pair("r2", 5, 2)]
    completion_mask_BC = torch.tensor(
        [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    mask_BC = loss_mask(completion_mask_BC, 1)
    got = teacher_logprobs(pairs, mask_BC, 2)
    expect_token = [1.0, 2.0, 3.0, 101.0, 201.0, 202.0, 203.0, 204.0]
    assert got.token_N.tolist() == expect_token
    assert got.topk_ids_NK[:, 0].tolist() == [0, 0, 0, 10, 20, 20, 20, 20]
    torch.testing.assert_close(got.topk_NK[:, 1], torch.tensor(expect_token) + 0.1)
    assert teacher_logprobs(pairs, mask_BC, 0).topk_ids_NK is None


# ----------------------------------------------------------------------------- the trainer's path


def _cfg(tiny_cache, run_dir, *extra):
    return load_config(
        TINY,
        [
            f"run_dir={run_dir}",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
            "trainer.save_every=0",
            "teacher.kind=live",
            "loss.temperature=1.0",
            *extra,
        ],
    )


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
@pytest.mark.parametrize(
    "loss", [["loss.divergence=sampled_pg"], ["loss.top_k=5", "loss.top_k_tail_bucket=true"]]
)
def test_micro_batch_loss_from_scores_equals_local_teacher(
    tiny_cache, tmp_path, tiny_text_dir, packing, fused, loss
):
    """micro_batch_loss on the tiny model's real rollouts: the live teacher's own log-probs and
    top-k, as per-row scores through the trainer's layout (skip_first_tokens=2), give the loss
    and LoRA gradients of the local teacher forward."""
    from opsd_mm.cli import build_trainer
    from opsd_mm.loss.micro_batch import micro_batch_loss
    from opsd_mm.model.forward import completion_logits, unwrap

    cfg = _cfg(
        tiny_cache,
        tmp_path,
        f"loss.fused={str(fused).lower()}",
        f"trainer.packing={str(packing).lower()}",
        "loss.skip_first_tokens=2",
        "loss.chunk_size=5",
        *loss,
    )
    trainer = build_trainer(cfg)
    rb = batches.generate(trainer.engine, trainer._draw(1), trainer.cfg)
    pairs = [
        trainer.processor.pair(ex, r.completion_ids, student=p, teacher=trainer.teacher_prompt(ex))
        for ex, p, g in zip(rb.examples, rb.prompts, rb.rollouts_P_G)
        for r in g
    ]
    batch = trainer.processor.collate(pairs)
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]

    def run(teacher_N):
        loss_, out, _ = micro_batch_loss(
            batch,
            model,
            trainer.teacher,
            0.1,
            cfg.loss,
            packed=trainer.packing,
            teacher_logprobs=teacher_N,
        )
        return loss_, out, torch.autograd.grad(loss_, params)

    ref_loss, ref, g_ref = run(None)
    # The teacher's own log-probs of every completion token, per row, as a server returns them.
    width_C = batch.completion_ids_BC.shape[1]
    with torch.no_grad():
        logits_BCV = completion_logits(unwrap(model), batch.teacher, width_C)
    logp_BCV = F.log_softmax(logits_BCV.float(), dim=-1)
    for b, pair in enumerate(pairs):
        n = len(pair.completion_ids)
        ids_C = batch.completion_ids_BC[b, :n]
        pair.teacher_scores = scores_from_full_logprobs(logp_BCV[b, :n], ids_C, cfg.loss.top_k)
    mask_BC = loss_mask(batch.completion_mask_BC, cfg.loss.skip_first_tokens)
    scored_loss, out, g_out = run(teacher_logprobs(pairs, mask_BC, cfg.loss.top_k))
    assert ref_loss.abs() > 0
    torch.testing.assert_close(scored_loss, ref_loss, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.div_N, ref.div_N, rtol=1e-4, atol=1e-6)
    # The scores come from an unpacked forward of the whole rows: equal to the loss's teacher
    # forward up to float rounding, so the tolerance is relative to each gradient's scale.
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


# ----------------------------------------------------------------------------- config refusals

SERVER = [
    "rollout.engine=vllm_server",
    "rollout.server_url=http://127.0.0.1:1",
    "teacher.kind=live",
    "teacher.scoring=server",
    "loss.divergence=sampled_pg",
    "loss.temperature=1.0",
]


def test_server_scoring_config_accepted():
    cfg = load_config(TINY, SERVER)
    assert cfg.teacher.scoring == "server"
    assert load_config(TINY).teacher.scoring == "local"
    load_config(TINY, [*SERVER, "loss.divergence=jsd", "loss.top_k=8"])
    # A fixed LoRA teacher is the server's base: its weights never change, so any sync schedule.
    fixed = load_config(TINY, [*SERVER, "teacher.kind=fixed", "rollout.sync_every=3"])
    assert fixed.teacher.kind == "fixed"
    load_config(TINY, [*SERVER, "teacher.kind=fixed", "rollout.async=true"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.engine=hf", "rollout.engine"),
        ("teacher.kind=ema", "teacher.kind"),
        ("rollout.sync_every=2", "rollout.sync_every"),
        ("rollout.async=true", "rollout.async"),
        ("loss.temperature=0.7", "loss.temperature"),
        ("loss.divergence=jsd", "loss.divergence"),
    ],
)
def test_server_scoring_config_refusals(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}=.*teacher.scoring=server.* needs"):
        load_config(TINY, [*SERVER, override])


def test_server_scoring_temperature_follows_rollout():
    """loss.temperature null takes rollout.temperature: 0.7 there is refused too."""
    over = [x for x in SERVER if not x.startswith("loss.temperature")]
    with pytest.raises(ConfigError, match="loss.temperature=0.7"):
        load_config(TINY, [*over, "rollout.temperature=0.7"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.lora.enabled=false", "model.lora.enabled"),
        ("model.train_projector=true", "model.train_projector"),
        ("model.train_vision_tower=true", "model.train_vision_tower"),
        ("rollout.server_transport=gloo", "rollout.server_transport"),
    ],
)
def test_server_scoring_fixed_teacher_refusals(override, key):
    """A fixed teacher on the server is the base under the adapter: only LoRA may train."""
    with pytest.raises(ConfigError, match=rf"^{key}=.*teacher.kind=fixed needs"):
        load_config(TINY, [*SERVER, "teacher.kind=fixed", override])
