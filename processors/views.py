"""Per-role image views: what each side of a pair sees of the same question images.

Why views: the teacher's privilege can be in the pixels instead of the text - a zoomed crop of
the region that matters, a higher-resolution copy, the region marked - while the student sees
the plain, low-resolution or augmented image (Vision-OPD, ViCuR, VA-OPD). A view is an ordered
list of operations (``processor.student_view`` / ``processor.teacher_view``, one
:class:`~opsd_mm.config.sections.ViewOpConfig` each) applied to each question image, after it
is loaded and before the final resize, the chat template and the image processor. Pure
functions over PIL images; the processor (:mod:`.vl`) places what they return.

The rules:

- Each question image becomes a list of images: itself (possibly cut, marked or degraded) and
  any extra cuts (``placement: extra``), which go right after it in the prompt. Every later
  operation applies to every image the earlier ones made.
- Regions (``Example.regions``) are carried along in fractions of the current image, so a
  crop, a zoom or a random crop moves them; ``crop`` / ``zoom`` cut to the union of an image's
  boxes (plus ``margin``), ``mark`` draws each box. An image without a region passes the region
  operations unchanged.
- ``resolution`` is not an operation on pixels: it sets the bounds of the final resize
  (``qwen_vl_utils.smart_resize``, the processor's), wherever it stands in the list.
- Random operations (``random_crop``, or ``p`` below 1) draw from ``random.Random`` seeded by
  (seed, image index); the trainer passes a seed per (step, example)
  (:func:`opsd_mm.types.view_seed`), so every sample of an example sees the same pixels and a
  run is reproducible. Without a seed (evaluation, ``teacher_prompt``) they are left out.
- A box outside its image or without area is a :class:`BadImageError` naming the example and
  the region (:func:`region_boxes`), so ``processor.bad_image_policy`` skips or raises.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageColor, ImageDraw, ImageEnhance, ImageFilter

from opsd_mm.config.sections import REGION_VIEW_OPS, ViewOpConfig
from opsd_mm.types import BadImageError, Example

# A box in fractions of its image's width and height: (x0, y0, x1, y1).
Box = tuple[float, float, float, float]

# The defaults of the keys a ViewOpConfig leaves null (documented on its fields).
DEFAULTS: dict[str, Any] = {
    "margin": 0.0,
    "placement": "replace",
    "style": "box",
    "color": "red",
    "width": 3,
    "factor": 0.25,
    "quality": 30,
    "radius": 2.0,
    "scale": 0.8,
    "p": 1.0,
}
# How much darker ``mark`` with ``style: dim`` makes everything outside the boxes.
DIM_BRIGHTNESS = 0.35
# Qwen's smart_resize rejects a longer side over 200x the shorter one; a cut must not reach it.
MAX_ASPECT_RATIO = 200.0


def arg(op: ViewOpConfig, name: str) -> Any:
    """``op.name``, or its default when the config left it null."""
    value = getattr(op, name)
    return DEFAULTS[name] if value is None else value


def uses_regions(ops: Sequence[ViewOpConfig]) -> bool:
    return any(op.op in REGION_VIEW_OPS for op in ops)


def bounds(ops: Sequence[ViewOpConfig], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (min, max) pixels of the final resize: the view's ``resolution``, each bound
    falling back to the processor's (its min capped at the view's max, so that a view asking
    for fewer pixels than ``processor.min_pixels`` gets them)."""
    for op in ops:
        if op.op == "resolution":
            hi = op.max_pixels if op.max_pixels is not None else max_pixels
            lo = op.min_pixels if op.min_pixels is not None else min(min_pixels, hi)
            return lo, max(lo, hi)
    return min_pixels, max_pixels


def describe(ops: Sequence[ViewOpConfig]) -> str:
    """A view as one line (``data inspect``): ``zoom(margin=0.1, placement=extra), mark``."""
    if not ops:
        return "(as given)"
    parts = []
    for op in ops:
        keys = [f"{k}={v}" for k, v in vars(op).items() if k != "op" and v is not None]
        parts.append(f"{op.op}({', '.join(keys)})" if keys else op.op)
    return ", ".join(parts)


# ----------------------------------------------------------------------------- regions


def region_boxes(ex: Example, sizes: Sequence[tuple[int, int]]) -> list[list[Box]]:
    """Each question image's boxes in fractions of its size, from ``ex.regions``; ``sizes`` are
    the loaded images' (width, height). A region naming a missing image, a box outside its image
    or without area raises :class:`BadImageError` naming the example and the region."""
    out: list[list[Box]] = [[] for _ in sizes]
    for k, region in enumerate(ex.regions):
        source = f"region {k + 1} (image {region.image + 1})"
        if not 0 <= region.image < len(sizes):
            raise BadImageError(
                ex.id, source, f"the example has {len(sizes)} image(s), no image {region.image + 1}"
            )
        w, h = sizes[region.image]
        x0, y0, x1, y1 = (float(v) for v in region.box)
        units = "fractions" if region.normalized else f"pixels of the {w}x{h} image"
        limit_x, limit_y = (1.0, 1.0) if region.normalized else (float(w), float(h))
        shown = f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}] ({units})"
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise BadImageError(ex.id, source, f"box {shown} is not finite")
        if x1 <= x0 or y1 <= y0:
            raise BadImageError(ex.id, source, f"empty box {shown}: needs x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > limit_x or y1 > limit_y:
            raise BadImageError(ex.id, source, f"box {shown} lies outside the image")
        out[region.image].append((x0 / limit_x, y0 / limit_y, x1 / limit_x, y1 / limit_y))
    return out


def _union(boxes: Sequence[Box], margin: float) -> Box:
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[2] for b in boxes)
    y1 = max(b[3] for b in boxes)
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy)


def _pixel_window(box: Box, w: int, h: int) -> tuple[int, int, int, int]:
    """The pixel rectangle covering ``box`` (at least one pixel each way)."""
    left, top = min(int(math.floor(box[0] * w)), w - 1), min(int(math.floor(box[1] * h)), h - 1)
    right = max(left + 1, min(w, int(math.ceil(box[2] * w))))
    bottom = max(top + 1, min(h, int(math.ceil(box[3] * h))))
    return left, top, right, bottom


def _moved(boxes: Sequence[Box], window: tuple[int, int, int, int], w: int, h: int) -> list[Box]:
    """``boxes`` in fractions of the pixel ``window`` of a ``w`` x ``h`` image, clipped to it;
    boxes left without area are dropped."""
    left, top, right, bottom = window
    cw, ch = right - left, bottom - top
    out = []
    for x0, y0, x1, y1 in boxes:
        nx0, nx1 = (max(0.0, (x0 * w - left) / cw), min(1.0, (x1 * w - left) / cw))
        ny0, ny1 = (max(0.0, (y0 * h - top) / ch), min(1.0, (y1 * h - top) / ch))
        if nx1 > nx0 and ny1 > ny0:
            out.append((nx0, ny0, nx1, ny1))
    return out


# ----------------------------------------------------------------------------- operations


@dataclass
class _Viewed:
    """One image of a view in progress, with its boxes in fractions of it."""

    image: Image.Image
    boxes: list[Box]


def _cut(item: _Viewed, op: ViewOpConfig, max_pixels: int, example_id: str) -> _Viewed:
    """``crop`` / ``zoom``: the union of the boxes plus margin; zoom resizes to ``pixels``."""
    img = item.image
    window = _pixel_window(_union(item.boxes, arg(op, "margin")), img.width, img.height)
    cut = img.crop(window)
    ratio = max(cut.size) / min(cut.size)
    if ratio > MAX_ASPECT_RATIO:
        raise BadImageError(
            example_id,
            f"{op.op} of {img.width}x{img.height} image",
            f"the cut region is {cut.width}x{cut.height}, over {MAX_ASPECT_RATIO:.0f}:1",
        )
    boxes = _moved(item.boxes, window, img.width, img.height)
    if op.op == "zoom":
        budget = op.pixels if op.pixels is not None else max_pixels
        s = math.sqrt(budget / (cut.width * cut.height))
        size = (max(1, round(cut.width * s)), max(1, round(cut.height * s)))
        if size != cut.size:
            cut = cut.resize(size, Image.Resampling.BICUBIC)
    return _Viewed(cut, boxes)


def _mark(item: _Viewed, op: ViewOpConfig) -> _Viewed:
    """``mark``: each box's outline (``style: box``) or everything outside the boxes darkened
    (``style: dim``), on a copy."""
    img = item.image.copy()
    margin = arg(op, "margin")
    windows = [_pixel_window(_union([b], margin), img.width, img.height) for b in item.boxes]
    if arg(op, "style") == "dim":
        mask = Image.new("L", img.size, 0)
        draw = ImageDraw.Draw(mask)
        for left, top, right, bottom in windows:
            draw.rectangle([left, top, right - 1, bottom - 1], fill=255)
        dark = ImageEnhance.Brightness(img).enhance(DIM_BRIGHTNESS)
        return _Viewed(Image.composite(img, dark, mask), item.boxes)
    draw = ImageDraw.Draw(img)
    color = ImageColor.getrgb(arg(op, "color"))
    for left, top, right, bottom in windows:
        draw.rectangle([left, top, right - 1, bottom - 1], outline=color, width=arg(op, "width"))
    return _Viewed(img, item.boxes)


def _degrade(img: Image.Image, op: ViewOpConfig) -> Image.Image:
    """``downscale``, ``jpeg``, ``blur``, ``grayscale``: same size, less information."""
    if op.op == "downscale":
        f = arg(op, "factor")
        small = (max(1, round(img.width * f)), max(1, round(img.height * f)))
        down = img.resize(small, Image.Resampling.BILINEAR)
        return down.resize(img.size, Image.Resampling.NEAREST)
    if op.op == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=arg(op, "quality"))
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    if op.op == "blur":
        return img.filter(ImageFilter.GaussianBlur(arg(op, "radius")))
    return img.convert("L").convert("RGB")  # grayscale


def _random_crop(item: _Viewed, op: ViewOpConfig, rng: random.Random) -> _Viewed:
    img = item.image
    scale = arg(op, "scale")
    cw = max(1, round(img.width * rng.uniform(scale, 1.0)))
    ch = max(1, round(img.height * rng.uniform(scale, 1.0)))
    left, top = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
    window = (left, top, left + cw, top + ch)
    return _Viewed(img.crop(window), _moved(item.boxes, window, img.width, img.height))


def view_image(
    image: Image.Image,
    boxes: list[Box],
    ops: Sequence[ViewOpConfig],
    rng: random.Random | None,
    max_pixels: int,
    example_id: str,
) -> list[Image.Image]:
    """One question image through a view: the images it becomes, in prompt order (before the
    final resize). ``rng`` None leaves the random operations out; ``max_pixels`` is the role's
    bound (zoom's default budget)."""
    items = [_Viewed(image, list(boxes))]
    for op in ops:
        if op.op == "resolution":
            continue
        if op.random and rng is None:
            continue
        out: list[_Viewed] = []
        for item in items:
            if op.op in ("crop", "zoom"):
                if not item.boxes:
                    out.append(item)
                    continue
                cut = _cut(item, op, max_pixels, example_id)
                out += [item, cut] if arg(op, "placement") == "extra" else [cut]
            elif op.op == "mark":
                out.append(_mark(item, op) if item.boxes else item)
            elif op.op == "random_crop":
                out.append(_random_crop(item, op, rng))
            else:
                applies = op.p is None or op.p >= 1 or (rng is not None and rng.random() < op.p)
                out.append(_Viewed(_degrade(item.image, op), item.boxes) if applies else item)
        items = out
    return [item.image for item in items]


def view_images(
    ex: Example,
    images: Sequence[Image.Image],
    ops: Sequence[ViewOpConfig],
    seed: int | None,
    max_pixels: int,
) -> list[list[Image.Image]]:
    """Every question image of ``ex`` (loaded, RGB) through the view ``ops``: per image the
    images it becomes. Image i draws from ``random.Random(f"{seed}|{i}")``, so its pixels do
    not depend on the other images. Regions are checked (:func:`region_boxes`) when the view
    reads them."""
    if not ops:
        return [[img] for img in images]
    boxes = (
        region_boxes(ex, [im.size for im in images]) if uses_regions(ops) else [[] for _ in images]
    )
    out = []
    for i, (img, img_boxes) in enumerate(zip(images, boxes)):
        rng = random.Random(f"{seed}|{i}") if seed is not None else None
        out.append(view_image(img, img_boxes, ops, rng, max_pixels, ex.id))
    return out


__all__ = [
    "DEFAULTS",
    "arg",
    "bounds",
    "describe",
    "region_boxes",
    "uses_regions",
    "view_image",
    "view_images",
]
