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

What ``model/`` holds is checked, not trusted: an adapter whose config is not a LoRA config, or
whose weights file is truncated, empty, holds no tensor for a module the config adapts or one
for a module the base model lacks, or of the wrong shape, is an :class:`ExportError` naming the
directory (one line, exit 2), never a traceback and never a silent export of the base model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from opsd_mm.errors import UserError
from opsd_mm.model.load import VL_MODEL_TYPES

ADAPTER, FULL, SHARDED = "adapter", "full", "sharded"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What loading a damaged checkpoint raises, from transformers, peft, safetensors and DCP; other
# exceptions are bugs and keep their traceback.
LOAD_ERRORS = (ValueError, RuntimeError, KeyError, OSError, SafetensorError)


class ExportError(UserError):
    kind = "export error"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file, from its header (nothing else is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def check_adapter(model_dir: Path) -> list[str]:
    """The tensor names of the LoRA adapter in ``model_dir``, after checking what can be checked
    without the base model: ``adapter_config.json`` is a JSON object of a LoRA config, and
    ``adapter_model.safetensors`` a readable safetensors file holding LoRA tensors."""
    try:
        config = json.loads((model_dir / "adapter_config.json").read_bytes())
    except (OSError, ValueError) as e:
        raise ExportError(
            f"{model_dir}: adapter_config.json cannot be read: {_one_line(e)}"
        ) from None
    if not isinstance(config, dict):
        raise ExportError(f"{model_dir}: adapter_config.json is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise ExportError(
            f"{model_dir}: adapter_config.json has peft_type {config.get('peft_type')!r:.40}; "
            "export merges LoRA adapters (peft_type LORA), as training writes them"
        )
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ExportError(f"{model_dir}: adapter_config.json has rank r={r!r:.40}; need >= 1")
    weights = model_dir / ADAPTER_WEIGHTS
    try:
        names = _tensor_names(weights)
    except (OSError, SafetensorError) as e:  # missing, empty, truncated, not safetensors
        raise ExportError(
            f"{model_dir}: {ADAPTER_WEIGHTS} cannot be read ({_one_line(e)}); the checkpoint is "
            "incomplete or damaged"
        ) from None
    if not names or not all("lora_" in n for n in names):
        raise ExportError(
            f"{model_dir}: {ADAPTER_WEIGHTS} holds {len(names)} tensors, "
            f"{sum('lora_' in n for n in names)} of them LoRA's; an adapter holds only LoRA "
            "tensors"
        )
    return names


def _check_loaded_adapter(model: Any, model_dir: Path, names: list[str]) -> None:
    """Every LoRA parameter of the loaded model came from the file and every tensor of the file
    went into one: peft only warns about either, and the export would silently merge random or
    zero LoRA weights, or drop the adapter's."""
    adapter = getattr(model, "active_adapter", "default")
    in_model = {
        re.sub(rf"\.{re.escape(adapter)}(?=\.|$)", "", n)
        for n, _ in model.named_parameters()
        if "lora_" in n
    }
    in_file = set(names)
    missing, unexpected = sorted(in_model - in_file), sorted(in_file - in_model)
    if missing or unexpected:
        raise ExportError(
            f"{model_dir}: the adapter does not match its config on the base model: "
            f"{len(missing)} LoRA tensors missing from {ADAPTER_WEIGHTS} (e.g. {missing[:2]}), "
            f"{len(unexpected)} in it for modules the base model lacks (e.g. {unexpected[:2]})"
        )


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

        names = check_adapter(model_dir)  # before the base model loads
        base_config = AutoConfig.from_pretrained(base, **kw)
        dtype = getattr(base_config, "dtype", None) or torch.float32
        model = _loader(base_config.model_type).from_pretrained(base, dtype=torch.float32, **kw)
        try:
            model = PeftModel.from_pretrained(model, str(model_dir))
        except LOAD_ERRORS as e:  # a shape, rank or target that does not fit the base
            raise ExportError(
                f"{model_dir}: the adapter does not fit the base model {base}: {_one_line(e)}"
            ) from None
        _check_loaded_adapter(model, model_dir, names)
        model = model.merge_and_unload()
        return model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype))
    if layout == FULL:
        try:
            mtype = AutoConfig.from_pretrained(model_dir, trust_remote_code=kw["trust_remote_code"])
            model, info = _loader(mtype.model_type).from_pretrained(
                model_dir,
                dtype="auto",
                trust_remote_code=kw["trust_remote_code"],
                output_loading_info=True,
            )
        except LOAD_ERRORS as e:
            raise ExportError(f"{model_dir}: the model cannot be loaded: {_one_line(e)}") from None
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in info.get("missing_keys", []) if k not in tied]
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        bad = missing + list(info.get("mismatched_keys", []))
        if bad:
            raise ExportError(
                f"{model_dir}: the saved weights do not cover the model ({len(bad)} missing or "
                f"mis-shaped, e.g. {bad[:2]}); the checkpoint is incomplete or damaged"
            )
        return model
    if layout == SHARDED:
        import torch.distributed.checkpoint as dcp

        from opsd_mm.model.load import setup_trainable

        base_config = AutoConfig.from_pretrained(base, **kw)
        dtype = getattr(base_config, "dtype", None) or torch.float32
        model = _loader(base_config.model_type).from_pretrained(base, dtype=torch.float32, **kw)
        model = setup_trainable(model, cfg.model)
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        sharded = checkpoint / "sharded"
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            dcp.load({"model": trainable}, checkpoint_id=str(sharded), no_dist=True)
        except (CheckpointException, *LOAD_ERRORS) as e:
            raise ExportError(f"{sharded}: cannot be read: {_one_line(e)}") from None
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
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        save_processor(base, model.config.model_type, tmp, cfg)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:  # a full disk, Ctrl-C: no partial output
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
