"""What the generation server's client and the server itself share, importable without vLLM.

The trainer's environment has no vLLM, so nothing the client needs may live in a module that
reaches vLLM-side code: the weight names and their iteration (LoRA merged, wrapper prefixes
dropped), the manifest of a weight set (names, dtypes, shapes: what the server checks before it
loads anything), the safetensors shards the file transport writes and the server reloads, image
encoding over HTTP, the token's environment variable and the run claim's headers. The colocated
engine (``opsd_mm.rollout.vllm_engine``) syncs through the same :func:`iter_sync_weights`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

TOKEN_ENV = "OPSD_MM_SERVER_TOKEN"
SHARD_BYTES = 2 << 30
# Every request that uses or changes the server's weights names the client's claim (a random id
# per client, shared by the processes of one run) and, for messages, the run (URL-quoted).
CLAIM_HEADER = "Opsd-Claim"
RUN_HEADER = "Opsd-Run"

# (checkpoint name, dtype name, shape) of each weight of a set, in the order it is sent.
Manifest = list[tuple[str, str, list[int]]]


class WeightSetError(ValueError):
    """A weight set (a directory of safetensors, or a manifest) that must not be loaded."""


# ----------------------------------------------------------------------------- images


def encode_image(image: Any) -> str:
    """A PIL image as base64 PNG (lossless, so the server encodes exactly the trainer's pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str) -> Any:
    """The image encoded by :func:`encode_image`. Raises ``ValueError`` saying what is wrong
    (not base64, not an image, truncated, over PIL's decompression-bomb limit), so a server
    answers a bad image with 400 and the reason."""
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"not a readable image: {type(e).__name__}: {e}") from None
    return image


# ----------------------------------------------------------------------------- weight names

# peft parameter names that are adapter state, never checkpoint weights.
_ADAPTER_PARAM = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|original_module)\."
)
# ``x.modules_to_save.<adapter>.weight`` is the trained copy of ``x.weight``.
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.")


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync_manifest(model: torch.nn.Module) -> Manifest:
    """(checkpoint name, dtype, shape) of every weight :func:`iter_sync_weights` yields, in its
    order, without computing any: no LoRA merge (a merged weight keeps its base weight's dtype
    and shape) and no gather (a sharded weight's shape is its global one). The group transport
    sends it first, so that the server checks the whole set before it loads a tensor."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return [
        (checkpoint_name(name), dtype_name(tensor.dtype), list(tensor.shape))
        for name, tensor in model.state_dict().items()
        if not _ADAPTER_PARAM.search(name)
    ]


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


# safetensors' dtype codes as torch's names (the codes of the format's specification).
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def safetensors_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a weight directory: those its ``model.safetensors.index.json``
    names when it has one (as vLLM's loader does), else every ``*.safetensors`` in it. Raises
    :class:`WeightSetError` naming the path when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise WeightSetError(f"weight directory {directory} {what}")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightSetError(f"{index}: not a safetensors index ({e})") from None
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightSetError(f"{index} names files that are missing: {missing[:5]}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightSetError(f"no *.safetensors in {directory}")
    return files


def file_manifest(files: Sequence[Path]) -> Manifest:
    """The manifest of safetensors ``files``, read from their headers alone (no tensor is
    loaded). A file that is not safetensors or is truncated is a :class:`WeightSetError`
    naming it; so is a name that two files hold."""
    from safetensors import safe_open

    manifest: Manifest = []
    seen: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in seen:
                        raise WeightSetError(f"weight {name} is in both {seen[name]} and {path}")
                    seen[name] = path
                    piece = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype())
                    manifest.append((name, dtype, list(piece.get_shape())))
        except WeightSetError:
            raise
        except Exception as e:  # safetensors' own error types differ between versions
            raise WeightSetError(f"{path}: not a readable safetensors file ({e})") from None
    return manifest


def iter_safetensors(files: Sequence[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in ``files``, one at a time, in :func:`file_manifest`'s
    order."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _is_float(dtype: str) -> bool | None:
    dt = getattr(torch, dtype, None)
    return dt.is_floating_point if isinstance(dt, torch.dtype) else None


def _some(names: Sequence[str], k: int = 5) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def weight_set_problems(
    reference: Manifest | None,
    incoming: Manifest,
    key: Any = None,
    optional: Any = None,
) -> list[str]:
    """Why ``incoming`` must not replace the weights of ``reference`` (empty: it may).

    Compared entry by entry under ``key(name)``, a key two spellings of one engine weight share
    (vLLM's name mapping: a Qwen-VL checkpoint's ``model.layers.*`` and transformers'
    ``model.language_model.layers.*`` load into the same tensor); a key of None is a name the
    engine ignores. The set must be complete (every reference weight), hold nothing else
    (except names ``optional(name)`` allows, such as a tied ``lm_head.weight``), each weight
    once, with the reference's shape and a dtype of the same kind (floating point or not: the
    engine converts between float dtypes as it loads, so a float32 trainer may refresh a
    bfloat16 server). ``reference`` None: only the duplicates are checked."""
    key = key or (lambda name: name)
    optional = optional or (lambda name: False)
    problems: list[str] = []
    sent: dict[Any, tuple[str, str, list[int]]] = {}
    twice: list[str] = []
    for name, dtype, shape in incoming:
        k = key(name)
        if k is None:
            continue
        if k in sent:
            twice.append(name if sent[k][0] == name else f"{name} (as {sent[k][0]})")
            continue
        sent[k] = (name, dtype, list(shape))
    if twice:
        problems.append(f"{len(twice)} weight(s) sent twice: {_some(twice)}")
    if reference is None:
        return problems
    held: dict[Any, tuple[str, str, list[int]]] = {}
    for name, dtype, shape in reference:
        k = key(name)
        if k is not None:
            held[k] = (name, dtype, list(shape))
    missing = [held[k][0] for k in held if k not in sent]
    extra = [sent[k][0] for k in sent if k not in held and not optional(sent[k][0])]
    if missing:
        problems.append(
            f"{len(missing)} of the engine's {len(held)} weights missing: {_some(missing)}"
        )
    if extra:
        problems.append(f"{len(extra)} weight(s) the engine does not have: {_some(extra)}")
    shapes, dtypes = [], []
    for k, (name, dtype, shape) in sent.items():
        if k not in held:
            continue
        _, want_dtype, want_shape = held[k]
        if shape != want_shape:
            shapes.append(f"{name} {shape} (engine {want_shape})")
        elif dtype != want_dtype and _is_float(dtype) is not _is_float(want_dtype):
            dtypes.append(f"{name} {dtype} (engine {want_dtype})")
    if shapes:
        problems.append(f"{len(shapes)} weight(s) of another shape: {_some(shapes)}")
    if dtypes:
        problems.append(f"{len(dtypes)} weight(s) of another kind of dtype: {_some(dtypes)}")
    return problems
