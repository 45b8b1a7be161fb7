"""Image loading and validation for vision-language examples.

Why a module of its own: datasets hand images over in many forms (PIL objects, raw bytes, the
``{"bytes": ..., "path": ...}`` dicts of a ``datasets`` Image feature with ``decode=False``,
paths relative to a data directory), and a single bad image must not crash a long run or, worse,
reach the model as garbage. Every image goes through :func:`load_image`, which either returns an
RGB ``PIL.Image`` or raises :class:`BadImageError` naming the example, the source and the reason.

The decompression-bomb guard reads the width and height from the file header (``Image.open`` is
lazy) and rejects images above ``max_image_pixels`` before any pixel is decoded.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from opsd_mm.errors import UserError

logger = logging.getLogger(__name__)

# Qwen's smart_resize rejects images whose longer side exceeds 200x the shorter one.
MAX_ASPECT_RATIO = 200.0


class BadImageError(UserError):
    """An image that cannot be used. ``source`` says where it came from (a path, or a short
    description such as ``<bytes: 812 B>``); ``reason`` says what is wrong with it."""

    kind = "image error"

    def __init__(self, example_id: str, source: str, reason: str):
        self.example_id = example_id
        self.source = source
        self.reason = reason
        super().__init__(
            f"example '{example_id}': bad image {source}: {reason}. Fix or drop the image, or set "
            "processor.bad_image_policy=skip to skip (and count) such examples."
        )


def describe_source(src: Any) -> str:
    """A short, log-friendly name for an image source (never the raw bytes)."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<bytes: {len(src)} B>"
    if isinstance(src, dict):
        if src.get("path"):
            return str(src["path"])
        data = src.get("bytes")
        return f"<bytes: {len(data)} B>" if data is not None else "<empty image dict>"
    if isinstance(src, Image.Image):
        return f"<PIL {src.mode} {src.width}x{src.height}>"
    return f"<{type(src).__name__}>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (what Qwen's own loader does for RGBA)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16/32-bit greyscale: scale into 8 bits first; PIL has no direct conversion to RGB.
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _check_geometry(width: int, height: int, max_image_pixels: int) -> str | None:
    """The reason an image of this size is unusable, or None."""
    if width <= 0 or height <= 0:
        return f"zero-size image ({width}x{height})"
    if width * height > max_image_pixels:
        return (
            f"{width}x{height} = {width * height:,} pixels exceeds processor.max_image_pixels="
            f"{max_image_pixels:,} (decompression-bomb guard; checked before decoding)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (
            f"aspect ratio {ratio:.0f}:1 exceeds {MAX_ASPECT_RATIO:.0f}:1 (Qwen resize rejects it)"
        )
    return None


def _open_checked(fp: Any, example_id: str, source: str, max_image_pixels: int) -> Image.Image:
    """Open lazily, check the header's size, then decode fully (so truncation shows up here)."""
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:  # PIL's own, larger limit
        raise BadImageError(example_id, source, f"decompression bomb: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImageError(example_id, source, f"cannot identify image: {e}") from e
    reason = _check_geometry(img.width, img.height, max_image_pixels)
    if reason is not None:
        img.close()
        raise BadImageError(example_id, source, reason)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(example_id, source, f"corrupt image data: {e}") from e
    return img


def load_image(
    src: Any,
    example_id: str,
    data_dir: str | os.PathLike | None = None,
    max_image_pixels: int = 50_000_000,
) -> Image.Image:
    """Load one image as RGB, or raise :class:`BadImageError`.

    ``src`` is a ``PIL.Image``, ``bytes``, a ``{"bytes": ..., "path": ...}`` dict (bytes win when
    both are set, as in ``datasets``), or a path (relative paths resolve against ``data_dir``).
    URLs are refused: runs never touch the network; download the images first.
    """
    source = describe_source(src)
    if isinstance(src, Image.Image):
        reason = _check_geometry(src.width, src.height, max_image_pixels)
        if reason is not None:
            raise BadImageError(example_id, source, reason)
        try:
            src.load()
            return _to_rgb(src)
        except (OSError, ValueError) as e:
            raise BadImageError(example_id, source, f"cannot convert to RGB: {e}") from e

    if isinstance(src, dict):
        if src.get("bytes") is not None:
            src = src["bytes"]
        elif src.get("path"):
            src = src["path"]
        else:
            raise BadImageError(example_id, source, "image dict has neither bytes nor path")

    if isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise BadImageError(example_id, source, "empty bytes")
        img = _open_checked(io.BytesIO(bytes(src)), example_id, source, max_image_pixels)
    elif isinstance(src, (str, os.PathLike)):
        text = str(src)
        if text.startswith(("http://", "https://")):
            raise BadImageError(
                example_id, source, "URLs are not fetched at run time; download the image first"
            )
        if text.startswith("file://"):
            text = text[len("file://") :]
        path = Path(text)
        if not path.is_absolute() and data_dir is not None:
            path = Path(data_dir) / path
        if not path.is_file():
            raise BadImageError(example_id, str(path), "file not found")
        img = _open_checked(path, example_id, str(path), max_image_pixels)
    else:
        raise BadImageError(example_id, source, "unsupported image source type")

    try:
        return _to_rgb(img)
    except (OSError, ValueError) as e:
        raise BadImageError(example_id, source, f"cannot convert {img.mode} to RGB: {e}") from e


def resolve_source(src: Any, data_dir: str | os.PathLike | None) -> Any:
    """``src`` with a relative path made absolute against ``data_dir`` (other sources as they
    are), so that the image can be loaded later without knowing the data directory."""
    if data_dir is None:
        return src
    if isinstance(src, (str, os.PathLike)) and not str(src).startswith(("http://", "https://")):
        text = str(src)[len("file://") :] if str(src).startswith("file://") else str(src)
        return str(Path(data_dir) / text) if not Path(text).is_absolute() else src
    if isinstance(src, dict) and src.get("bytes") is None and src.get("path"):
        return {**src, "path": resolve_source(src["path"], data_dir)}
    return src


def load_example_images(
    example_id: str,
    sources: Sequence[Any] | None,
    data_dir: str | os.PathLike | None,
    cfg: Any,
    on_bad: Callable[[BadImageError], None] | None = None,
) -> list[Image.Image] | None:
    """Load all images of one example, applying ``cfg.bad_image_policy``.

    ``cfg`` is a ``ProcessorConfig`` (``max_image_pixels``, ``bad_image_policy``). Policy
    ``raise``: the first bad image raises :class:`BadImageError` (naming the example and file).
    Policy ``skip``: returns None, so the caller drops the example; the error goes to ``on_bad``
    (the data loader counts it there) or, without a callback, to the log with the example id.
    """
    images: list[Image.Image] = []
    for src in sources or ():
        try:
            images.append(load_image(src, example_id, data_dir, cfg.max_image_pixels))
        except BadImageError as err:
            if cfg.bad_image_policy == "raise":
                raise
            if on_bad is not None:
                on_bad(err)
            else:
                logger.warning("skipping example: %s", err)
            return None
    return images
