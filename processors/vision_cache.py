"""Vision encoded once per step: reuse the vision tower's outputs across forwards.

Why: in an OPSD step the teacher forward (no grad) and the student forward (with grad) see the
same images, and with a frozen vision tower both would encode them to identical features; on a
GPU the second encoding is 22-31% of the step (docs/environment.md). Rollouts sampled ``n``
times per prompt repeat each image ``n`` times within one forward as well. :class:`VisionCache`
wraps the vision tower's ``forward`` for the duration of a ``with`` block and encodes each
distinct image once; later requests for the same image reuse the stored outputs.

How: the tower receives ``hidden_states`` [sum_i t_i*h_i*w_i, D] (patch rows, images
concatenated) and ``grid_thw`` [n_images, 3]. Each image's rows are fingerprinted with an exact
integer hash of their bit pattern (independent of what else is in the batch), confirmed with
``torch.equal`` against the stored rows (so a hash collision can never return wrong features),
and only missing images go through the real forward, in one call. Every tensor in the tower's
output is split per image along dim 0 - by patch count (e.g. ``last_hidden_state``) or by merged
token count (``pooler_output``, Qwen3-VL's ``deepstack_features``) - and reassembled in the
requested order, in the same output structure.

With image views (``processor.student_view`` / ``teacher_view``, :mod:`.views`) an image is
what its view made of it: the key is the pixels after the view, so the cache is keyed by (image,
view) without knowing about views. Two roles that see an image the same way share one encoding;
each role's own view of it is encoded once; the view gain's teacher forward in the student's view
reuses the student's encodings.

When it stays out of the way (plain re-encoding): a vision parameter requires grad (vision
tower, projector or LoRA inside it is trained), the model has no ``visual`` module, the call asks
for extra outputs (attentions, hidden states) or precomputed vision kwargs, or an output cannot
be split per image.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Keyword arguments that do not change what the tower computes per image.
_NEUTRAL_KWARGS = {"return_dict"}


def find_vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision tower of a Qwen-VL model, through DDP / peft / accelerate wrappers.

    Tries ``model.visual`` and ``model.model.visual`` after unwrapping ``.module`` (DDP) and
    ``get_base_model()`` (peft), then falls back to the first submodule named ``visual``.
    """
    candidates = [model]
    inner = model
    for _ in range(4):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        else:
            break
        candidates.append(inner)
    for cand in candidates:
        for path in ("visual", "model.visual"):
            obj: Any = cand
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.Module):
                return obj
    for name, module in model.named_modules():
        if name == "visual" or name.endswith(".visual"):
            return module
    return None


class _Unsplittable(Exception):
    """An output tensor whose first dimension matches neither per-image size list."""


def _flatten(out: Any) -> tuple[list[torch.Tensor], Any]:
    """Tensors of a (nested) tower output and a spec to rebuild it (tensor, tuple, list, dict,
    ModelOutput dataclass; ``None`` fields are kept in the spec)."""
    leaves: list[torch.Tensor] = []

    def walk(x: Any) -> Any:
        if torch.is_tensor(x):
            leaves.append(x)
            return ("T",)
        if x is None:
            return ("N",)
        if isinstance(x, (list, tuple)) and not hasattr(x, "keys"):
            return ("L", type(x), tuple(walk(v) for v in x))
        if hasattr(x, "keys"):  # dict or transformers ModelOutput (an OrderedDict dataclass)
            if dataclasses.is_dataclass(x):
                items = tuple((f.name, walk(getattr(x, f.name))) for f in dataclasses.fields(x))
            else:
                items = tuple((k, walk(x[k])) for k in x.keys())
            return ("D", type(x), items)
        raise _Unsplittable(f"unsupported vision output type {type(x).__name__}")

    return leaves, walk(out)


def _unflatten(spec: Any, leaves: list[torch.Tensor]) -> Any:
    it = iter(leaves)

    def build(s: Any) -> Any:
        if s[0] == "T":
            return next(it)
        if s[0] == "N":
            return None
        if s[0] == "L":
            return s[1](build(v) for v in s[2])
        return s[1](**{k: build(v) for k, v in s[2]})

    return build(spec)


@dataclasses.dataclass
class _Entry:
    pixels: torch.Tensor  # this image's patch rows, to confirm a fingerprint match exactly
    pieces: list[torch.Tensor]  # this image's slice of every output leaf, detached
    spec: Any


class VisionCache:
    """Context manager: while active, each distinct image is encoded at most once.

    ``with VisionCache(model): teacher_forward(); student_forward()`` - the teacher (under
    no_grad) fills the cache, the student reuses it. Numerically the reused features are the
    features the same tower computed for that image (bit-identical to re-encoding up to the
    matmul blocking of a differently sized batch). ``stats`` counts images requested and
    actually encoded; ``active`` says whether reuse is on.
    """

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self.visual = find_vision_tower(model)
        self.enabled = enabled
        self.active = False
        self.stats = {"calls": 0, "images_requested": 0, "images_encoded": 0}
        self._entries: dict[tuple, list[_Entry]] = {}
        self._weights: dict[tuple, torch.Tensor] = {}
        self._had_instance_forward = False
        self._orig_forward: Any = None

    # ---------------------------------------------------------------- context management

    def __enter__(self) -> VisionCache:
        visual = self.visual
        if not self.enabled or visual is None:
            return self
        if any(p.requires_grad for p in visual.parameters()):
            logger.debug("vision reuse off: a vision parameter requires grad")
            return self
        self._had_instance_forward = "forward" in visual.__dict__
        self._orig_forward = visual.forward
        visual.forward = self._forward
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            if self._had_instance_forward:
                self.visual.forward = self._orig_forward
            else:
                del self.visual.forward
        self.active = False
        self._entries.clear()
        self._weights.clear()

    # ---------------------------------------------------------------- fingerprints

    def _fingerprints(self, rows_ND: torch.Tensor, sizes: list[int]) -> list[tuple[int, int]]:
        """Two integers per image from the bit pattern of its rows (every few columns).

        The bits are read as 32-bit (or 16-bit) integers and combined with integer weights in
        float64 so that every partial sum is an exact integer below 2**53: the result does not
        depend on summation order, hence not on what else is in the batch, and the same image
        always gets the same key. (|bits| < 2**31, weights < 2**10, at most 2**11 columns.)
        It is only a bucket key: a match is confirmed with ``torch.equal``.
        """
        x = rows_ND.detach()
        x = x if x.is_contiguous() else x.contiguous()
        bits = x.view(torch.int16 if x.element_size() == 2 else torch.int32)
        if x.element_size() == 1:
            bits = x.view(torch.int8)
        n_rows, width = bits.shape
        stride = max(3, -(-width // 2048))
        key = (width, stride, x.device)
        if key not in self._weights:
            gen = torch.Generator().manual_seed(width)
            w = torch.randint(1, 2**10, (len(range(0, width, stride)),), generator=gen)
            self._weights[key] = w.to(device=x.device, dtype=torch.float64)
        w_D = self._weights[key]
        row_N = torch.empty(n_rows, dtype=torch.int64, device=x.device)
        for start in range(0, n_rows, 8192):  # bound the float64 temporary
            chunk = bits[start : start + 8192, ::stride].to(torch.float64)
            row_N[start : start + 8192] = (chunk @ w_D).to(torch.int64)
        row_N = torch.remainder(row_N, 2**31 - 1)
        image_of_row = torch.repeat_interleave(
            torch.arange(len(sizes), device=x.device), torch.tensor(sizes, device=x.device)
        )
        starts = torch.tensor([0] + sizes[:-1], device=x.device).cumsum(0)
        local = torch.arange(n_rows, device=x.device) - starts[image_of_row]
        fp1 = torch.zeros(len(sizes), dtype=torch.int64, device=x.device)
        fp2 = torch.zeros_like(fp1)
        fp1.index_add_(0, image_of_row, row_N)
        fp2.index_add_(0, image_of_row, row_N * (local % 61 + 1))
        return list(zip(fp1.tolist(), fp2.tolist()))

    def _lookup(self, key: tuple, rows: torch.Tensor) -> _Entry | None:
        for entry in self._entries.get(key, ()):
            if entry.pixels.shape == rows.shape and torch.equal(entry.pixels, rows):
                return entry
        return None

    # ---------------------------------------------------------------- the wrapped forward

    def _forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        orig = self._orig_forward
        extra = [
            k
            for k, v in kwargs.items()
            if k not in _NEUTRAL_KWARGS and v is not None and v is not False
        ]
        if extra or grid_thw is None or hidden_states.dim() != 2:
            return orig(hidden_states, grid_thw=grid_thw, **kwargs)
        grids = [tuple(g) for g in grid_thw.tolist()]
        sizes = [t * h * w for t, h, w in grids]
        merge = int(getattr(self.visual, "spatial_merge_size", 2)) ** 2
        merged = [s // merge for s in sizes]
        if sum(sizes) != hidden_states.shape[0]:
            return orig(hidden_states, grid_thw=grid_thw, **kwargs)

        self.stats["calls"] += 1
        self.stats["images_requested"] += len(grids)
        rows = list(hidden_states.split(sizes))
        fps = self._fingerprints(hidden_states, sizes)
        keys = [(fp, g, hidden_states.dtype, hidden_states.device) for fp, g in zip(fps, grids)]

        # Which request each image resolves to: a stored entry, or the first request in this
        # call with equal pixels (to be encoded now).
        resolved: list[_Entry | int] = []
        to_encode: list[int] = []
        for i, key in enumerate(keys):
            entry = self._lookup(key, rows[i])
            if entry is not None:
                resolved.append(entry)
                continue
            dup = next(
                (j for j in to_encode if keys[j] == key and torch.equal(rows[j], rows[i])), None
            )
            if dup is None:
                to_encode.append(i)
                dup = i
            resolved.append(dup)

        fresh: dict[int, list[torch.Tensor]] = {}
        spec = None
        if to_encode:
            all_new = to_encode == list(range(len(grids)))
            sub_hidden = hidden_states if all_new else torch.cat([rows[i] for i in to_encode])
            sub_grid = grid_thw if all_new else grid_thw[to_encode]
            out = orig(sub_hidden, grid_thw=sub_grid, **kwargs)
            self.stats["images_encoded"] += len(to_encode)
            try:
                leaves, spec = _flatten(out)
                per_leaf = [
                    self._split(leaf, [sizes[i] for i in to_encode], [merged[i] for i in to_encode])
                    for leaf in leaves
                ]
            except _Unsplittable as e:
                logger.warning("vision reuse off for this step: %s", e)
                self.__exit__()
                return out if all_new else orig(hidden_states, grid_thw=grid_thw, **kwargs)
            for n, i in enumerate(to_encode):
                pieces = [chunks[n] for chunks in per_leaf]
                fresh[i] = pieces
                entry = _Entry(rows[i], [p.detach() for p in pieces], spec)
                self._entries.setdefault(keys[i], []).append(entry)
            if all_new:
                return out  # exactly the plain forward

        pieces_per_image = [fresh[r] if isinstance(r, int) else r.pieces for r in resolved]
        specs = [r.spec for r in resolved if not isinstance(r, int)]
        spec = spec if spec is not None else specs[0]
        if any(s != spec for s in specs):
            return orig(hidden_states, grid_thw=grid_thw, **kwargs)
        leaves = [torch.cat(parts) for parts in zip(*pieces_per_image)]
        return _unflatten(spec, leaves)

    @staticmethod
    def _split(leaf: torch.Tensor, sizes: list[int], merged: list[int]) -> list[torch.Tensor]:
        """``leaf`` cut per image along dim 0, by patch rows or by merged tokens."""
        n = leaf.shape[0] if leaf.dim() > 0 else -1
        if n == sum(sizes):
            return list(leaf.split(sizes))
        if n == sum(merged):
            return list(leaf.split(merged))
        raise _Unsplittable(f"an output of shape {tuple(leaf.shape)} is not per image")


__all__ = ["VisionCache", "find_vision_tower"]
