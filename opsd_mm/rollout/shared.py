"""What the generation server's client and the server itself share, importable without vLLM.

The trainer's environment has no vLLM, so nothing the client needs may live in a module that
reaches vLLM-side code: the weight names and their iteration (LoRA merged, wrapper prefixes
dropped), the safetensors shards the file transport writes and the server reloads, image
encoding over HTTP, and the token's environment variable. The colocated engine
(``opsd_mm.rollout.vllm_engine``) syncs through the same :func:`iter_sync_weights`.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TOKEN_ENV = "OPSD_MM_SERVER_TOKEN"
SHARD_BYTES = 2 << 30

# ----------------------------------------------------------------------------- images


def encode_image(image: Any) -> str:
    """A PIL image as base64 PNG (lossless, so the server encodes exactly the trainer's pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


# ----------------------------------------------------------------------------- weight names

# peft parameter names that are adapter state, never checkpoint weights.
_ADAPTER_PARAM = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|original_module)\."
)
# ``x.modules_to_save.<adapter>.weight`` is the trained copy of ``x.weight``.
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.")


# ----------------------------------------------------------------------------- weight names


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft LoRA layers by module name (duck-typed: no peft import needed)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if hasattr(mod, "lora_A") and hasattr(mod, "get_delta_weight")
    }


def _merged_delta(layer: torch.nn.Module) -> torch.Tensor | None:
    """The summed weight delta of the layer's active, not-yet-merged adapters (None: none)."""
    if getattr(layer, "disable_adapters", False):
        return None
    merged = set(getattr(layer, "merged_adapters", ()))
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A or name in merged:
            continue
        if getattr(layer, "use_dora", {}).get(name, False):
            raise NotImplementedError(
                f"weight sync: adapter '{name}' uses DoRA, whose merge needs the weight norm; "
                "merge it with peft's merge_and_unload() on a copy, or train plain LoRA"
            )
        d = layer.get_delta_weight(name)
        delta = d if delta is None else delta + d
    return delta


def checkpoint_name(name: str) -> str:
    """The Hugging Face checkpoint name of a (possibly peft- or compile-wrapped) parameter:
    wrapper prefixes, ``.base_layer`` and ``.modules_to_save.<adapter>`` dropped."""
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = name.replace(".base_layer.", ".")
    return _MODULES_TO_SAVE.sub(".", name)


@torch.no_grad()
def iter_sync_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight of ``model``, LoRA merged in, lazily.

    Why a generator: vLLM's in-place reload consumes one tensor at a time, so a merged LoRA
    weight exists only while it is being copied, never a merged copy of the whole model.
    Adapter parameters (``lora_A`` / ``lora_B`` / ``original_module``) are skipped; the base
    weight of a LoRA layer is sent as ``base + B @ A * scaling`` under its plain name.
    Sharded (DTensor) parameters are gathered with ``full_tensor()``.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    layers = _lora_layers(model)
    for name, tensor in model.state_dict().items():
        if _ADAPTER_PARAM.search(name):
            continue
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        module_name, sep, param = name.rpartition(".base_layer.")
        if sep and param == "weight" and module_name in layers:
            delta = _merged_delta(layers[module_name])
            if delta is not None:
                tensor = tensor + delta.to(tensor.dtype)
        yield checkpoint_name(name), tensor


# ----------------------------------------------------------------------------- shards


def save_sync_weights(model: torch.nn.Module, directory: str | Path) -> int:
    """Write ``model``'s weights (LoRA merged, checkpoint names) as safetensors shards of at
    most ``SHARD_BYTES`` into ``directory``, replacing the previous ones. Returns bytes written.

    Tensors that share storage (tied embeddings) are written once each under their own name,
    as separate copies: safetensors refuses shared storage."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.safetensors"):
        old.unlink()
    shard: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    size = total = 0
    index = 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            tmp = directory / f".model-{index:05d}.tmp"
            save_file(shard, str(tmp), metadata={"format": "pt"})
            tmp.rename(directory / f"model-{index:05d}.safetensors")
            index += 1
        shard, size = {}, 0

    for name, tensor in iter_sync_weights(model):
        t = tensor.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        t = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    return total
