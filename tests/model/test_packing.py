"""Padding-free (packed) forwards against the padded reference, and token-budget micro-batches
against row micro-batches: per-row logits, step loss and gradients (tiny text model, CPU)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opsd_mm.cli import build_trainer
from opsd_mm.config import ProcessorConfig
from opsd_mm.model.forward import completion_hidden, completion_logits
from opsd_mm.model.packing import pack_inputs, token_micro_batches
from opsd_mm.types import Example
from tests.train.test_trainer import _cfg, _step_with_grads

LENGTHS = (3, 17, 1, 9)


@pytest.fixture(scope="module")
def text_setup(tiny_text_dir):
    from transformers import AutoModelForCausalLM

    from opsd_mm.processors import build_processor

    proc = build_processor(ProcessorConfig(), str(tiny_text_dir), "text")
    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i, n in enumerate(LENGTHS):  # odd lengths, a 1-token completion, different prompts
        ex = Example(id=f"e{i}", question="What is " + "1 + " * i + "2?", privileged="t " * (i + 1))
        pairs.append(proc.pair(ex, torch.randint(10, 200, (n,), generator=g).tolist()))
    return proc, model, proc.collate(pairs)


def test_token_micro_batches_balanced_and_complete():
    lengths = [5, 40, 7, 12, 100, 3, 30]
    items = list(range(len(lengths)))
    for packed in (True, False):
        mbs = token_micro_batches(items, lengths, 50, packed=packed)
        assert sorted(i for mb in mbs for i in mb) == items
        assert [100] in [[lengths[i] for i in mb] for mb in mbs]  # over budget: alone
        for mb in mbs:
            ls = [lengths[i] for i in mb]
            cost = sum(ls) if packed else len(ls) * max(ls)
            assert len(mb) == 1 or cost <= 50
        flat = [lengths[i] for mb in mbs for i in mb]
        assert flat == sorted(lengths, reverse=True)  # longest first


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_logits_match_padded(text_setup, dtype, tol):
    proc, model, batch = text_setup
    model = model.to(dtype)
    try:
        C = batch.completion_ids_BC.shape[1]
        mask_BC = batch.completion_mask_BC.bool()
        for side in (batch.student, batch.teacher):
            with torch.no_grad():
                ref_NV = completion_logits(model, side, C)[mask_BC].float()
                got_NV = completion_logits(model, side, C, mask_BC, packed=True).float()
                h_ref, _ = completion_hidden(model, side, C, mask_BC)
                h_got, _ = completion_hidden(model, side, C, mask_BC, packed=True)
            assert got_NV.shape == ref_NV.shape == (sum(LENGTHS), model.config.vocab_size)
            scale = ref_NV.abs().max().item()
            assert (got_NV - ref_NV).abs().max().item() <= tol * max(scale, 1.0)
            assert (h_got.float() - h_ref.float()).abs().max().item() <= tol * 10
    finally:
        model.float()


def test_packed_rows_do_not_see_each_other(text_setup):
    """Negative control: the same packed ids with positions that do NOT restart per row (one
    long causal sequence) give different logits, so the parity above comes from the
    block-diagonal mask transformers builds from the restarting position ids."""
    _, model, batch = text_setup
    inputs, _ = pack_inputs(model, batch.teacher)
    S = inputs["input_ids"].shape[1]
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
        inputs["position_ids"] = torch.arange(S)[None]
        joined = model(**inputs, use_cache=False).logits
    first = int(batch.teacher.attention_mask_BT[0].sum())
    assert torch.allclose(packed[0, :first], joined[0, :first], atol=1e-5)
    assert (packed[0, first:] - joined[0, first:]).abs().max() > 1e-3


def _grads_close(g_ref, g_got, rtol=1e-4, atol=1e-8):
    assert g_ref.keys() == g_got.keys() and g_ref
    for n in g_ref:
        assert torch.allclose(g_got[n], g_ref[n], rtol=rtol, atol=atol), n


@pytest.mark.parametrize(
    "lora, fused",
    [
        (True, False),
        (True, True),
        (False, False),
        pytest.param(False, True, marks=pytest.mark.slow),
    ],
    ids=["lora-naive", "lora-fused", "full-naive", "full-fused"],
)
def test_packed_step_matches_padded(tiny_cache, tmp_path, tiny_text_dir, lora, fused):
    """One training step packed and padded: same loss, divergences and gradients."""
    results = []
    for packing in (False, True):
        cfg = _cfg(
            tiny_cache,
            tmp_path / str(packing),
            f"trainer.packing={str(packing).lower()}",
            f"model.lora.enabled={str(lora).lower()}",
            f"loss.fused={str(fused).lower()}",
            "trainer.batch_size=2",
            "rollout.n=2",
            "trainer.micro_batch_size=3",
            "trainer.save_every=0",
        )
        t = build_trainer(cfg)
        assert t.packing is packing
        results.append(_step_with_grads(t))
    (m_pad, g_pad), (m_pack, g_pack) = results
    assert m_pad["loss"] > 0
    assert m_pack["loss"] == pytest.approx(m_pad["loss"], rel=1e-5)
    assert m_pack["divergence_max"] == pytest.approx(m_pad["divergence_max"], rel=1e-4)
    _grads_close(g_pad, g_pack)


@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_matches_row_micro_batches(tiny_cache, tmp_path, tiny_text_dir, packing):
    """micro_batch_tokens regroups the rows (longest first, balanced); the loss stays the
    step-wide token mean, so loss and gradients equal those of row micro-batches."""
    results = []
    for tokens in (0, 120):
        cfg = _cfg(
            tiny_cache,
            tmp_path / f"{packing}-{tokens}",
            f"trainer.packing={str(packing).lower()}",
            f"trainer.micro_batch_tokens={tokens}",
            "trainer.batch_size=2",
            "rollout.n=3",
            "trainer.micro_batch_size=2",
            "trainer.save_every=0",
        )
        results.append(_step_with_grads(build_trainer(cfg)))
    (m_rows, g_rows), (m_tok, g_tok) = results
    assert m_rows["loss"] > 0
    assert m_tok["loss"] == pytest.approx(m_rows["loss"], rel=1e-5)
    _grads_close(g_rows, g_tok)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("fused", [False, True], ids=["naive", "fused"])
def test_packed_vl_step_matches_padded(tiny_cache, tmp_path, family, fused):
    """One VL training step (LoRA, images, the vision-once cache) packed and padded: same loss
    and gradients."""
    from opsd_mm.config import load_config

    tiny_vl = Path(__file__).resolve().parents[2] / "configs" / "tiny_vl.yaml"
    results = []
    for packing in (False, True):
        cfg = load_config(
            tiny_vl,
            [
                f"run_dir={tmp_path / str(packing)}",
                f"model.name_or_path=tiny:{family}",
                f"model.tiny_cache_dir={tiny_cache}",
                "logging.progress=false",
                "trainer.save_every=0",
                f"trainer.packing={str(packing).lower()}",
                f"loss.fused={str(fused).lower()}",
            ],
        )
        t = build_trainer(cfg)
        assert t.packing is packing
        results.append(_step_with_grads(t))
    (m_pad, g_pad), (m_pack, g_pack) = results
    assert m_pad["loss"] > 0
    assert m_pack["loss"] == pytest.approx(m_pad["loss"], rel=1e-5)
    _grads_close(g_pad, g_pack, atol=1e-7)


def test_micro_batch_tokens_range_checked(tmp_path):
    from opsd_mm.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny_text.yaml"
    with pytest.raises(ConfigError, match="trainer.micro_batch_tokens"):
        load_config(tiny, [f"run_dir={tmp_path}", "trainer.micro_batch_tokens=-1"])


def test_packable_names_why_not(text_setup):
    from types import SimpleNamespace

    from opsd_mm.model.packing import packable

    _, model, _ = text_setup
    assert packable(model) is None
    odd = SimpleNamespace(config=SimpleNamespace(_attn_implementation="paged_attention"))
    assert "paged_attention" in packable(odd)
    vl = SimpleNamespace(
        config=SimpleNamespace(_attn_implementation="sdpa", model_type="llava", vision_config={})
    )
    assert "llava" in packable(vl)


# ------------------------------------------------------------------ trainer.packing=auto


def test_resolve_packing_auto_follows_the_attention(text_setup, monkeypatch):
    """auto packs through an attention that skips the packed block's masked parts (CUDA:
    flash-attention's varlen kernel when installed, else flex attention); without one (the CPU)
    it packs row micro-batches and pads token budgets, as measured fastest on the CPU."""
    import importlib.util

    from opsd_mm.model.packing import resolve_packing

    _, model, _ = text_setup
    rows = resolve_packing(model, "auto", "cpu", half=False, micro_batch_tokens=0)
    assert (rows.packed, rows.attention) == (True, None) and "row micro-batches" in rows.reason
    budget = resolve_packing(model, "auto", "cpu", half=False, micro_batch_tokens=2048)
    assert (budget.packed, budget.attention) == (False, None)
    assert "token budgets" in budget.reason and "CUDA" in budget.reason
    forced = resolve_packing(model, True, "cpu", half=False, micro_batch_tokens=2048)
    assert (forced.packed, forced.attention) == (True, None)
    off = resolve_packing(model, False, "cuda", half=True, micro_batch_tokens=0)
    assert (off.packed, off.attention) == (False, None)
    # On CUDA (resolution only: nothing runs here): flex attention, which Qwen3 supports...
    gpu = resolve_packing(model, "auto", "cuda", half=True, micro_batch_tokens=2048)
    assert (gpu.packed, gpu.attention) == (True, "flex_attention")
    # ... or flash-attention's varlen kernel when flash_attn is installed and the forwards are
    # bf16/fp16 (fp32 stays on flex: flash-attention has no fp32 kernel).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a),
    )
    flash = resolve_packing(model, "auto", "cuda", half=True, micro_batch_tokens=2048)
    assert flash.attention == "flash_attention_2"
    assert resolve_packing(model, "auto", "cuda", half=False, micro_batch_tokens=0).attention == (
        "flex_attention"
    )


def test_resolve_packing_without_a_skipping_attention_on_cuda():
    # A model class without flex attention (transformers' Qwen-VL classes) and no flash_attn:
    # auto pads token budgets on CUDA too, and says why.
    from opsd_mm.model.packing import resolve_packing

    class NoFlex(torch.nn.Module):
        _supports_sdpa = True

        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(_attn_implementation="sdpa", model_type="qwen3")

    plan = resolve_packing(NoFlex(), "auto", "cuda", half=False, micro_batch_tokens=512)
    assert (plan.packed, plan.attention) == (False, None)
    assert "NoFlex has no flex attention" in plan.reason


def test_packed_attention_switches_the_text_attention_and_restores_it(text_setup):
    from opsd_mm.model.packing import packed_attention

    _, model, _ = text_setup
    assert model.config._attn_implementation == "sdpa"
    with packed_attention(model, None):
        assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with packed_attention(model, "flex_attention"):
            assert model.config._attn_implementation == "flex_attention"
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_trainer_logs_what_auto_chose(tiny_cache, tmp_path, tiny_text_dir, caplog):
    import logging

    results = {}
    for tokens in (0, 256):
        cfg = _cfg(tiny_cache, tmp_path / str(tokens), f"trainer.micro_batch_tokens={tokens}")
        assert cfg.trainer.packing == "auto"  # the default
        with caplog.at_level(logging.INFO, logger="opsd_mm.train.trainer"):
            t = build_trainer(cfg)
        results[tokens] = (t.packing, t.packed_attention)
    assert results == {0: (True, None), 256: (False, None)}
    assert "trainer.packing=auto: packed rows" in caplog.text
    assert "trainer.packing=auto: padded rows" in caplog.text


@pytest.mark.slow
def test_flex_attention_packed_forward_matches_padded(text_setup):
    """The attention a GPU packs through (flex attention's block mask from the packed position
    ids) gives the padded layout's logits. On the CPU flex attention has a forward only (no
    backward): a no-grad forward here (one side: each new packed length recompiles), the
    training step on CUDA in the gpu test below."""
    from opsd_mm.model.packing import packed_attention

    _, model, batch = text_setup
    C = batch.completion_ids_BC.shape[1]
    mask_BC = batch.completion_mask_BC.bool()
    with torch.no_grad():
        ref_NV = completion_logits(model, batch.teacher, C)[mask_BC]
        with packed_attention(model, "flex_attention"):
            got_NV = completion_logits(model, batch.teacher, C, mask_BC, packed=True)
    assert model.config._attn_implementation == "sdpa"
    assert (got_NV - ref_NV).abs().max().item() <= 1e-5 * max(ref_NV.abs().max().item(), 1)


@pytest.mark.gpu
def test_packed_step_through_the_skipping_attention_matches_padded_on_cuda(
    tiny_cache, tmp_path, tiny_text_dir
):
    """On CUDA trainer.packing=auto packs through flex attention (or flash-attention's varlen
    kernel): one bf16-autocast step, token budgets, against padded rows: same loss and
    gradients to bf16 accuracy (tolerances as the fused-vs-naive autocast test)."""
    results = []
    for packing in ("false", "auto"):
        cfg = _cfg(
            tiny_cache,
            tmp_path / packing,
            f"trainer.packing={packing}",
            "trainer.micro_batch_tokens=200",
            "trainer.batch_size=2",
            "rollout.n=3",
            "trainer.save_every=0",
        )
        t = build_trainer(cfg)
        assert t.packing is (packing == "auto")
        if packing == "auto":
            assert t.packed_attention in ("flex_attention", "flash_attention_2")
        results.append(_step_with_grads(t))
    (m_pad, g_pad), (m_pack, g_pack) = results
    assert m_pack["loss"] == pytest.approx(m_pad["loss"], rel=2e-2)
    for n in g_pad:
        scale = float(g_pad[n].abs().max())
        torch.testing.assert_close(g_pack[n], g_pad[n], rtol=5e-2, atol=5e-2 * scale)
