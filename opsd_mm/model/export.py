"""``opsd-mm export CHECKPOINT --out DIR``: a checkpoint as a standalone model for inference.

A checkpoint (``opsd_mm/train/checkpoint.py``) holds only what training changed: under LoRA the
adapter, under full fine-tuning the whole model, in ``model/``. Inference engines (vLLM,
transformers ``from_pretrained``) want one directory with the full weights, the config and the
tokenizer / processor files. Export builds it from the checkpoint directory and its run's
``config.yaml`` (two levels up: ``RUN_DIR/checkpoints/step-N``), which names the base model.

Layouts of ``model/`` (:func:`checkpoint_layout`):
    adapter   ``adapter_config.json`` + ``adapter_model.safetensors``: the base model is loaded
              in float32, the adapter merged into it (peft ``merge_and_unload``), and the result
              cast back to the base's dtype - so the merge itself adds no bf16 rounding.
    full      ``config.json`` + ``*.safetensors``: the weights as saved, in their dtype.
    sharded   FSDP2's ``sharded/`` (``torch.distributed.checkpoint``, no ``model/``): the
              base model is loaded in float32 and made trainable as the run's config says
              (LoRA or full), the saved trainable parameters are loaded into it (DCP gathers
              the shards, in one process), then the adapter is merged as for ``adapter`` and
              the result cast back to the base's dtype.

The output is written into a temporary sibling directory and renamed into place, so ``DIR``
is either complete or absent. An existing non-empty ``DIR`` is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from opsd_mm.errors import UserError
from opsd_mm.model.load import VL_MODEL_TYPES

ADAPTER, FULL, SHARDED = "adapter", "full", "sharded"


class ExportError(UserError):
    kind = "export error"


def checkpoint_layout(model_dir: Path) -> str:
    """Which of the layouts in the module docstring ``model_dir`` holds."""
    if (model_dir / "adapter_config.json").is_file():
        return ADAPTER
    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        return FULL
    if (model_dir.parent / "sharded" / ".metadata").is_file():
        return SHARDED
    found = sorted(p.name for p in model_dir.iterdir())[:8] if model_dir.is_dir() else "nothing"
    raise ExportError(
        f"{model_dir}: not a checkpoint layout export knows (expected adapter_config.json, "
        f"or config.json with *.safetensors, or ../sharded/.metadata); found {found}"
    )


def run_config_of(checkpoint: Path):
    """The run's resolved config, ``RUN_DIR/config.yaml`` for ``RUN_DIR/checkpoints/step-N``."""
    from opsd_mm.config import load_config

    path = checkpoint.parent.parent / "config.yaml"
    if not path.is_file():
        raise ExportError(
            f"{path}: missing; export reads the base model from the run's config.yaml "
            "(give a checkpoint inside its run directory: RUN_DIR/checkpoints/step-N)"
        )
    return load_config(path)


def _loader(model_type: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if model_type in VL_MODEL_TYPES else AutoModelForCausalLM


def load_trained(checkpoint: Path, layout: str, base: str, cfg) -> torch.nn.Module:
    """The trained model as one plain transformers module (LoRA merged), on the CPU."""
    from transformers import AutoConfig

    model_dir = checkpoint / "model"
    kw = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    if layout == ADAPTER:
        from peft import PeftModel

        base_config = AutoConfig.from_pretrained(base, **kw)
        dtype = getattr(base_config, "dtype", None) or torch.float32
        model = _loader(base_config.model_type).from_pretrained(base, dtype=torch.float32, **kw)
        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
        return model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype))
    if layout == FULL:
        mtype = AutoConfig.from_pretrained(model_dir, trust_remote_code=kw["trust_remote_code"])
        return _loader(mtype.model_type).from_pretrained(
            model_dir, dtype="auto", trust_remote_code=kw["trust_remote_code"]
        )
    if layout == SHARDED:
        import torch.distributed.checkpoint as dcp

        from opsd_mm.model.load import setup_trainable

        base_config = AutoConfig.from_pretrained(base, **kw)
        dtype = getattr(base_config, "dtype", None) or torch.float32
        model = _loader(base_config.model_type).from_pretrained(base, dtype=torch.float32, **kw)
        model = setup_trainable(model, cfg.model)
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        sharded = checkpoint / "sharded"
        dcp.load({"model": trainable}, checkpoint_id=str(sharded), no_dist=True)
        if cfg.model.lora.enabled:
            model = model.merge_and_unload()
        return model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype))
    raise AssertionError(f"unhandled layout {layout}")


def save_processor(base: str, model_type: str, out: Path, cfg) -> None:
    """The base model's tokenizer (text) or processor (VL: tokenizer, image processor, chat
    template), as ``from_pretrained`` and vLLM look for them beside the weights."""
    from transformers import AutoProcessor, AutoTokenizer

    kw = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    cls = AutoProcessor if model_type in VL_MODEL_TYPES else AutoTokenizer
    cls.from_pretrained(base, **kw).save_pretrained(out)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write checkpoint ``checkpoint`` as a full model with its tokenizer/processor into
    ``out`` (complete or absent: written beside it, then renamed). Returns ``out``."""
    from opsd_mm.model.load import resolve_model_path

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "state.json").is_file():
        raise ExportError(
            f"{checkpoint}: not a complete checkpoint (no state.json); give "
            "RUN_DIR/checkpoints/step-N"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not empty; choose a new directory")
    layout = checkpoint_layout(checkpoint / "model")  # before anything loads
    cfg = run_config_of(checkpoint)
    base = resolve_model_path(cfg.model)
    model = load_trained(checkpoint, layout, base, cfg).eval()
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_processor(base, model.config.model_type, tmp, cfg)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return out
