"""Loading models for training and inference, and making the right parameters trainable.

Text models load with ``AutoModelForCausalLM`` and vision-language models with
``AutoModelForImageTextToText``, picked from the checkpoint's ``model_type``. ``tiny:<name>``
resolves to a tiny offline model built by ``opsd_mm.model.tiny``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from opsd_mm.config import ConfigError, ModelConfig, RunConfig

log = logging.getLogger(__name__)

VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Name fragments of vision-tower and projector modules in the Qwen-VL families.
VISION_TOWER_PATTERN = re.compile(r"(^|\.)visual\.(?!merger)")
PROJECTOR_PATTERN = re.compile(r"(^|\.)visual\.(merger|deepstack_merger_list)")


def resolve_model_path(cfg: ModelConfig, key: str = "model.name_or_path") -> str:
    """A local directory or hub id for ``cfg.name_or_path`` (``tiny:`` built on first use).

    A name that is neither an existing path nor a well-formed hub id (``name`` or
    ``owner/name``) is a ConfigError naming ``key``: the hub's own message ("Repo id must be in
    the form ...") hides that the usual cause is a mistyped local path.
    """
    name = cfg.name_or_path
    if name.startswith("tiny:"):
        from opsd_mm.model.tiny import resolve_tiny

        return str(resolve_tiny(name.split(":", 1)[1], cfg.tiny_cache_dir))
    if not Path(name).exists():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name)
        except HFValidationError:
            raise ConfigError(
                f"{key}: '{name}' is neither a local directory (no such path) nor a valid hub id "
                "(name or owner/name); check the path"
            ) from None
    return name


def model_type_of(path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code
    ).model_type


def check_model_family(cfg: RunConfig, model_type: str) -> None:
    """The config checks that need the model's family: run right after its config.json is read
    (``model_type``), before the processor or any weight loads. A ConfigError names the key.

    - ``processor.kind`` set to a Qwen-VL family for a model that is not one;
    - ``processor.student_prompt_format=specials_stripped`` for a vision-language model
      (stripping special tokens would remove the vision start/end and image pad tokens).
    """
    p = cfg.processor
    is_vl = model_type in VL_MODEL_TYPES
    if p.kind not in ("auto", "text") and not is_vl:
        raise ConfigError(
            f"processor.kind={p.kind} but {cfg.model.name_or_path} is not a vision-language "
            f"model (model_type {model_type!r}); use processor.kind=auto"
        )
    if is_vl and p.student_prompt_format != "chat_template":
        raise ConfigError(
            f"processor.student_prompt_format={p.student_prompt_format} is not supported for "
            "vision-language models (stripping special tokens would remove the vision start/end "
            "and image pad tokens the images are placed by); use chat_template"
        )


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path: str, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load the base model in the configured dtype and attention implementation."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    device = torch.device(device)
    mtype = model_type_of(path, cfg.revision, cfg.trust_remote_code)
    cls = AutoModelForImageTextToText if mtype in VL_MODEL_TYPES else AutoModelForCausalLM
    model = cls.from_pretrained(
        path,
        revision=cfg.revision,
        dtype=torch_dtype(cfg.dtype, device),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    return model.to(device)


def setup_trainable(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """LoRA on the language model (default) or full fine-tuning; the vision tower frozen unless
    ``train_vision_tower``; the projector trainable when ``train_projector``.

    Returns the model to train (a ``PeftModel`` under LoRA).
    """
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_regex,
            bias="none",
        )
        model = get_peft_model(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    for name, p in model.named_parameters():
        if VISION_TOWER_PATTERN.search(name):
            p.requires_grad_(cfg.train_vision_tower)
        elif PROJECTOR_PATTERN.search(name):
            p.requires_grad_(
                cfg.train_projector or (cfg.train_vision_tower and not cfg.lora.enabled)
            )
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    if n_train == 0:
        raise ConfigError(
            "no trainable parameters: model.lora.target_regex matched no module "
            f"({cfg.lora.target_regex!r}); check the regex against the model's module names"
        )
    log.info("trainable parameters: %d / %d (%.2f%%)", n_train, n_all, 100 * n_train / n_all)
    return model


def load_for_inference(
    path: str, adapter: str | None = None, device: torch.device | str = "cpu", dtype: str = "auto"
) -> torch.nn.Module:
    """A model ready for generation: base weights, with a LoRA adapter merged in if given."""
    model = load_model(path, ModelConfig(name_or_path=path, dtype=dtype), device)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"--adapter: no adapter_config.json in {adapter}")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()
