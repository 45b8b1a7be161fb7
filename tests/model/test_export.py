"""`opsd-mm export`: a checkpoint of a tiny run, exported, loads with transformers alone and
gives the trained model's greedy output and logits (LoRA merged; full fine-tuning; one VL
family). vLLM loading the same export is tests/vllm/test_vllm_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opsd_mm.cli import build_trainer, main
from opsd_mm.config import load_config
from opsd_mm.model.export import ExportError, checkpoint_layout, export_checkpoint
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.types import Example

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUESTIONS = ["Compute 3 + 4.", "What is the total of eight and nine?", "Find 12 - 5 + 7 - 2."]
LOGIT_ATOL = 1e-4  # fp32; merged W + s*B@A against the adapter computed on the side


def _train(tiny_cache, run_dir, config="tiny_text.yaml", *extra):
    overrides = [
        f"run_dir={run_dir}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        "trainer.max_steps=2",
        "trainer.save_every=1",
        "rollout.max_new_tokens=8",
        *extra,
    ]
    trainer = build_trainer(load_config(CONFIGS / config, overrides))
    trainer.train()
    return trainer


def _prompt_ids(trainer) -> list[list[int]]:
    return [
        trainer.processor.student_prompt(Example(id="x", question=q)).input_ids for q in QUESTIONS
    ]


@torch.no_grad()
def _greedy_and_logits(model, prompts):
    model.eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        seq = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12
        )
        out.append((seq[0, len(ids) :].tolist(), model(input_ids=seq).logits[0].float()))
    return out


def _assert_same(trained, exported):
    """The same greedy completions and logits. The merged weights and the adapter beside the
    base are two computations, so two near-equal logits may order differently: the completions
    may part only at such a near tie (within 2 x LOGIT_ATOL in the trained model), and the
    logits are compared over the tokens both saw."""
    assert sum(len(g) for g, _ in trained) > 3 * len(trained)  # not all stopping at once
    for (g0, l0), (g1, l1) in zip(trained, exported):
        prompt = l0.shape[0] - len(g0)  # logits row prompt - 1 + i predicts completion token i
        n = next((i for i, (a, b) in enumerate(zip(g0, g1)) if a != b), len(g0))
        if g1 != g0:
            row = l0[prompt - 1 + n]
            assert abs(row[g0[n]] - row[g1[n]]) <= 2 * LOGIT_ATOL, (g0, g1)
        torch.testing.assert_close(l1[: prompt + n], l0[: prompt + n], atol=LOGIT_ATOL, rtol=0)


def _export_and_load_text(trainer, run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step2 = ckpt.latest_checkpoint(run_dir)
    assert step2.name == "step-000002"
    out = tmp_path / "export"
    assert main(["export", str(step2), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    prompts = _prompt_ids(trainer)
    # The exported tokenizer renders and tokenises like the training processor's.
    assert tok(QUESTIONS[0])["input_ids"] == trainer.processor.tokenizer(QUESTIONS[0])["input_ids"]
    return model, prompts, out


@pytest.mark.slow
def test_export_lora_merges_and_matches_the_trained_model(tiny_cache, tiny_text_dir, tmp_path):
    run_dir = tmp_path / "run"
    trainer = _train(tiny_cache, run_dir)
    assert checkpoint_layout(ckpt.latest_checkpoint(run_dir) / "model") == "adapter"
    model, prompts, out = _export_and_load_text(trainer, run_dir, tmp_path)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not (out / "adapter_config.json").exists()
    trained = _greedy_and_logits(trainer.model, prompts)
    _assert_same(trained, _greedy_and_logits(model, prompts))
    # Not the base model: the merge changed the weights.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([prompts[0]])
        assert not torch.allclose(base(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)


@pytest.mark.slow
def test_export_full_finetune_matches_the_trained_model(tiny_cache, tiny_text_dir, tmp_path):
    run_dir = tmp_path / "run"
    trainer = _train(tiny_cache, run_dir, "tiny_text.yaml", "model.lora.enabled=false")
    assert checkpoint_layout(ckpt.latest_checkpoint(run_dir) / "model") == "full"
    model, prompts, _ = _export_and_load_text(trainer, run_dir, tmp_path)
    trained = dict(trainer.model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n].detach()), n
    _assert_same(_greedy_and_logits(trainer.model, prompts), _greedy_and_logits(model, prompts))


@pytest.mark.slow
def test_export_lora_vl_qwen2_5_loads_with_its_processor(tiny_cache, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run_dir = tmp_path / "run"
    trainer = _train(tiny_cache, run_dir, "tiny_vl.yaml", "model.name_or_path=tiny:qwen2.5-vl")
    out = export_checkpoint(ckpt.latest_checkpoint(run_dir), tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    ex = trainer.stream.examples[0]
    prompt = trainer.processor.student_prompt(ex)
    assert prompt.mm_inputs, "a VL example with an image"
    inputs = {"input_ids": torch.tensor([prompt.input_ids]), **prompt.mm_inputs}
    if prompt.token_type_ids is not None:
        inputs["mm_token_type_ids"] = torch.tensor([prompt.token_type_ids])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


def _fake_checkpoint(tmp_path, files: dict[str, str]) -> Path:
    step = tmp_path / "run" / "checkpoints" / "step-000001"
    (step / "model").mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "run" / "config.yaml").write_text("model: {name_or_path: tiny:text}\n")
    for name, text in files.items():
        (step / "model" / name).write_text(text)
    return step


def test_export_refuses_unknown_layouts_and_used_out_dir(tmp_path):
    """(Exporting a sharded FSDP2 checkpoint: tests/train/test_distributed.py.)"""
    odd = _fake_checkpoint(tmp_path / "a", {"weights.bin": ""})
    with pytest.raises(ExportError, match="not a checkpoint layout export knows"):
        export_checkpoint(odd, tmp_path / "out-a")
    sharded = _fake_checkpoint(tmp_path / "b", {})
    (sharded / "sharded").mkdir()
    (sharded / "sharded" / ".metadata").write_text("")
    assert checkpoint_layout(sharded / "model") == "sharded"
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(sharded, used)
    with pytest.raises(ExportError, match="state.json"):
        export_checkpoint(tmp_path, tmp_path / "out-c")
    assert not list(tmp_path.glob("**/.tmp-*"))
    # The command line: one line, exit 2.
    assert main(["export", str(odd), "--out", str(tmp_path / "out-d")]) == 2


def _error_line(capsys, kind: str = "export error") -> str:
    """The one error line, last on stderr. Before it may come transformers' progress bars and
    warnings (and, in a long test session, its handler's complaint about a stream an earlier
    test captured); a traceback of ours cannot: main() returned 2, which only a user error
    does, and prints none without --debug."""
    lines = capsys.readouterr().err.strip().splitlines()
    found = [x for x in lines if x.startswith(f"{kind}: ")]
    assert len(found) == 1 and lines[-1] == found[0], lines[-5:]
    return found[0]


@pytest.fixture(scope="module")
def lora_run(tiny_cache, tiny_text_dir, tmp_path_factory):
    """A 1-step LoRA run of the tiny text model; tests damage copies of its checkpoint."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    _train(tiny_cache, run_dir, "tiny_text.yaml", "trainer.max_steps=1")
    return run_dir


def _rewrite_tensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    save_file(change(load_file(str(path))), str(path))


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


ADAPTER_DAMAGE = {
    "truncated weights": lambda m: (m / "adapter_model.safetensors").write_bytes(
        (m / "adapter_model.safetensors").read_bytes()[:100]
    ),
    "empty weights file": lambda m: (m / "adapter_model.safetensors").write_bytes(b""),
    "missing weights file": lambda m: (m / "adapter_model.safetensors").unlink(),
    "no tensors": lambda m: _rewrite_tensors(m / "adapter_model.safetensors", lambda t: {}),
    "tensors of other modules": lambda m: _rewrite_tensors(
        m / "adapter_model.safetensors",
        lambda t: {k.replace("q_proj", "nosuch_proj"): v for k, v in t.items()},
    ),
    "mis-shaped tensors": lambda m: _rewrite_tensors(
        m / "adapter_model.safetensors",
        lambda t: {k: v.t().contiguous() if "q_proj.lora_A" in k else v for k, v in t.items()},
    ),
    "config not JSON": lambda m: (m / "adapter_config.json").write_text('{"r": 8,'),
    "config not an object": lambda m: (m / "adapter_config.json").write_text("[8]"),
    "config with another rank": lambda m: _edit_config(m / "adapter_config.json", r=4),
    "config targeting no module": lambda m: _edit_config(
        m / "adapter_config.json", target_modules=["nosuch_proj"]
    ),
    "config of another adapter type": lambda m: _edit_config(
        m / "adapter_config.json", peft_type="NOSUCH"
    ),
}


@pytest.mark.parametrize("damage", list(ADAPTER_DAMAGE))
def test_export_of_a_bad_adapter_is_one_line_and_leaves_nothing(lora_run, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    step = ckpt.latest_checkpoint(run)
    ADAPTER_DAMAGE[damage](step / "model")
    out = tmp_path / "export"
    assert main(["export", str(step), "--out", str(out)]) == 2
    assert _error_line(capsys).startswith(f"export error: {step / 'model'}: ")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_export_of_a_good_adapter_still_works(lora_run, tmp_path):
    out = export_checkpoint(ckpt.latest_checkpoint(lora_run), tmp_path / "export")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


@pytest.fixture(scope="module")
def full_run(tiny_cache, tiny_text_dir, tmp_path_factory):
    """A 1-step full fine-tuning run of the tiny text model."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    _train(tiny_cache, run_dir, "tiny_text.yaml", "trainer.max_steps=1", "model.lora.enabled=false")
    return run_dir


FULL_DAMAGE = {
    "truncated weights": lambda m: (m / "model.safetensors").write_bytes(
        (m / "model.safetensors").read_bytes()[:100]
    ),
    "a tensor missing": lambda m: _rewrite_tensors(
        m / "model.safetensors",
        lambda t: {k: v for k, v in t.items() if "layers.0.mlp.up_proj" not in k},
    ),
    "a mis-shaped tensor": lambda m: _rewrite_tensors(
        m / "model.safetensors",
        lambda t: {k: v[:-1] if "layers.0.mlp.up_proj" in k else v for k, v in t.items()},
    ),
}


@pytest.mark.parametrize("damage", list(FULL_DAMAGE))
def test_export_of_damaged_full_weights_is_one_line(full_run, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    step = ckpt.latest_checkpoint(run)
    assert checkpoint_layout(step / "model") == "full"
    FULL_DAMAGE[damage](step / "model")
    out = tmp_path / "export"
    assert main(["export", str(step), "--out", str(out)]) == 2
    assert _error_line(capsys).startswith(f"export error: {step / 'model'}: ")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
