"""Row mappers of the dataset presets: one function per real schema, row -> Example fields.

Why functions rather than column maps: the real schemas need more than renaming. MathVision's
options must reach the question in the benchmark's own format, chat data keeps its question in a
list of turns, ViRL39K wraps its answers in ``\\boxed{}``. Each mapper's docstring records the
schema it was written against and where that schema comes from, so a schema change upstream is
checked against one place.

A mapper returns a dict with ``question``, ``privileged``, ``answer``, ``images``, ``meta`` and
optionally ``id`` (the row index otherwise), ``teacher_images`` and ``regions`` (boxes on the
images, :func:`regions`), or raises :class:`RowSkip` with the reason, which the loader counts
(``data.bad_row_policy``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from opsd_mm.types import Region


class RowSkip(ValueError):
    """A row that cannot become an Example; the message is the reason, counted by the loader.
    ``example_id``: the row's id, when the mapper had read it before the problem."""

    def __init__(self, reason: str, example_id: str | None = None) -> None:
        super().__init__(reason)
        self.example_id = example_id


def text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def image_list(value: Any) -> tuple[Any, ...]:
    """A row's image(s) as a tuple: a list column, or one image; None entries dropped."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(v for v in value if v is not None)
    return (value,)


def first_key(row: dict[str, Any], *keys: str) -> Any:
    """The value of the first present key (hub mirrors rename a column or two)."""
    for k in keys:
        if k in row:
            return row[k]
    return None


# Region units (data.region_coords) -> the divisor that makes them fractions (None: pixels).
REGION_SCALE: dict[str, float | None] = {
    "pixel": None,
    "normalized": 1.0,
    "normalized_1000": 1000.0,
}


def _box(value: Any, units: str) -> tuple[float, float, float, float] | None:
    """Four finite numbers as a box, or None when ``value`` is not one."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    box = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in box):
        return None
    scale = REGION_SCALE[units]
    return box if scale is None else tuple(v / scale for v in box)  # type: ignore[return-value]


def regions(value: Any, units: str = "pixel") -> tuple[Region, ...]:
    """A regions column's value as :class:`~opsd_mm.types.Region`s.

    Accepted: null (no region); one box ``[x0, y0, x1, y1]`` (on the first image); a list with
    one entry per image, each null, a box, or a list of boxes; a JSON string of any of these.
    ``units`` (``data.region_coords``): ``pixel`` (of the original image), ``normalized``
    (fractions) or ``normalized_1000``. Anything else raises :class:`RowSkip` with the reason;
    whether a box fits its image is checked later, against the image."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise RowSkip(f"bad regions: not JSON ({e.msg})") from e
        return regions(value, units)
    normalized = REGION_SCALE[units] is not None
    single = _box(value, units)
    if single is not None:
        return (Region(0, single, normalized),)
    if not isinstance(value, (list, tuple)):
        raise RowSkip(f"bad regions: expected boxes [x0, y0, x1, y1], got {value!r:.60}")
    out: list[Region] = []
    for image, entry in enumerate(value):
        if entry is None:
            continue
        box = _box(entry, units)
        boxes = [box] if box is not None else [_box(b, units) for b in entry or []]
        if box is None and (not isinstance(entry, (list, tuple)) or None in boxes):
            raise RowSkip(
                f"bad regions: image {image + 1}'s entry is neither a box [x0, y0, x1, y1] nor a "
                f"list of boxes: {entry!r:.60}"
            )
        out += [Region(image, b, normalized) for b in boxes]
    return tuple(out)


# ms-swift's grounding ``objects.bbox_type`` -> data.region_coords' units.
_SWIFT_BBOX_TYPES = {"real": "pixel", "norm1": "normalized", "norm1000": "normalized_1000"}


def swift_objects(objects: Any) -> tuple[Region, ...]:
    """ms-swift's grounding annotation ``{"ref": [...], "bbox": [[x0, y0, x1, y1], ...],
    "bbox_type": "real" | "norm1" | "norm1000", "image_id": [...]}`` as regions: each box on the
    image ``image_id`` names (0 when absent), in the units ``bbox_type`` names (``real``,
    pixels, when absent). Source: ms-swift's custom dataset documentation (Customization /
    Custom-dataset, grounding), and rows written in that format."""
    if not objects:
        return ()
    if not isinstance(objects, dict):
        raise RowSkip(f"bad objects: expected a mapping with bbox, got {objects!r:.60}")
    bbox_type = objects.get("bbox_type") or "real"
    units = _SWIFT_BBOX_TYPES.get(bbox_type)
    if units is None:
        raise RowSkip(f"bad objects: unknown bbox_type {bbox_type!r} (real, norm1 or norm1000)")
    boxes = objects.get("bbox") or []
    image_ids = objects.get("image_id") or [0] * len(boxes)
    if len(image_ids) != len(boxes):
        raise RowSkip(f"bad objects: {len(boxes)} boxes but {len(image_ids)} image ids")
    out = []
    for image, value in zip(image_ids, boxes):
        box = _box(value, units)
        if box is None:
            raise RowSkip(f"bad objects: bbox {value!r:.60} is not [x0, y0, x1, y1]")
        out.append(Region(int(image), box, REGION_SCALE[units] is not None))
    return tuple(out)


_BOXED = re.compile(r"^\s*\\boxed\{(.*)\}\s*$", re.DOTALL)


def unboxed(answer: str) -> str:
    """``\\boxed{17}`` -> ``17`` (the teacher template states the answer in words)."""
    m = _BOXED.match(answer)
    return m.group(1).strip() if m else answer.strip()


def mathvision_options(options: Sequence[str] | None) -> str:
    """MathVision's official option block, ``(A) x\\n(B) y\\n...``; empty when there are none or
    they are literally A..E (the choices are drawn in the image). The same rule and bytes as
    ``opsd_mm.eval.benchmarks.mathvision.format_options`` (a test holds them equal); duplicated
    because the core does not import the evaluation package."""
    options = list(options or [])
    if not options or "".join(options) == "ABCDE":
        return ""
    return "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))


# ----------------------------------------------------------------------------- text math


def opsd_math(row: dict[str, Any]) -> dict[str, Any]:
    """``siyanzhao/Openthoughts_math_30k_opsd`` (split ``train``, ~29k rows), the OPSD paper's
    text set: ``problem`` (question), ``solution`` (the privileged trace), ``Question``,
    ``Answer`` (final answer). Source: the OPSD reference implementation's data loader and the
    project's docs/benchmarks.md ("Training data with privileged traces")."""
    return {
        "question": text(row["problem"]),
        "privileged": text(row["solution"]),
        "answer": text(row.get("Answer")) or None,
        "images": (),
        "meta": {},
    }


# ----------------------------------------------------------------------------- We-Math 2.0


def wemath2_standard(row: dict[str, Any]) -> dict[str, Any]:
    """``We-Math/We-Math2.0-Standard`` (MathBook-Standard; split ``standard``, ~5.8k rows): ``id``,
    ``question``, ``image`` (one image), ``knowledge-level1`` .. ``knowledge-level4``,
    ``knowledge``, ``principle`` (the knowledge principle the problem exercises), ``idx``,
    ``answer``. The privileged text is the principle (``hint_v1``); the answer goes to
    ``Example.answer``. Source: the dataset card's ``dataset_info`` (huggingface.co/datasets/
    We-Math/We-Math2.0-Standard README, commit 5febc68: these ten columns, split ``standard``,
    5,843 rows) and its file tree (``data/standard-*.parquet``)."""
    return {
        "id": text(row.get("id") if row.get("id") is not None else row.get("idx")) or None,
        "question": text(row["question"]),
        "privileged": text(row.get("principle")),
        "answer": text(row.get("answer")) or None,
        "images": image_list(row.get("image")),
        "meta": {"knowledge": text(row.get("knowledge"))},
    }


def wemath2_pro(row: dict[str, Any]) -> dict[str, Any]:
    """``We-Math/We-Math2.0-Pro`` (MathBook-Pro; split ``pro``, 4,552 rows): ``question_id``,
    ``question``, ``image``, ``difficulty``, ``knowledge points`` (list of names), ``idx``,
    ``answer``. Answers only: the teacher gets the answer (``answer_only_v1``). Source: the
    dataset card's ``dataset_info`` (huggingface.co/datasets/We-Math/We-Math2.0-Pro README)."""
    points = row.get("knowledge points") or []
    return {
        "id": text(row.get("question_id")) or None,
        "question": text(row["question"]),
        "privileged": "",
        "answer": text(row.get("answer")) or None,
        "images": image_list(row.get("image")),
        "meta": {"difficulty": text(row.get("difficulty")), "knowledge_points": list(points)},
    }


# ----------------------------------------------------------------------------- MathVision


def mathvision(row: dict[str, Any]) -> dict[str, Any]:
    """``MathLLMs/MathVision`` schema (MATH-V; splits ``test`` 3,040 and ``testmini`` 304): ``id``,
    ``question`` (with ``<image1>``.. tags that all refer to ONE composite image), ``options``
    (``[]`` or five), ``image`` (relative path), ``decoded_image``, ``answer`` (letter or
    value), ``solution`` (760 of 3,040 rows), ``level``, ``subject``. Source: the dataset card
    and MATH-V's evaluation code (see eval/benchmarks/mathvision.py).

    The options are appended to the question as the official prompt prints them, so the student
    and the teacher see the choices exactly as evaluation does; the ``<imageN>`` tags stay text.
    The privileged trace is ``solution``; rows without one are skipped (counted) unless the
    teacher template needs only the answer. MathVision has no training split: training on
    the benchmark itself contaminates it (``opsd-mm data check`` reports that); use the preset
    for data in this schema."""
    options = mathvision_options(row.get("options"))
    question = text(row["question"])
    if options:
        question = question + "\n" + options.rstrip("\n")
    image = row.get("decoded_image")
    if image is None:
        image = row.get("image")
    return {
        "id": text(row.get("id")) or None,
        "question": question,
        "privileged": text(row.get("solution")),
        "answer": text(row.get("answer")) or None,
        "images": image_list(image),
        "meta": {
            "image_placeholders": False,
            "level": row.get("level"),
            "subject": row.get("subject"),
        },
    }


# ----------------------------------------------------------------------------- MMFineReason


def mmfinereason(row: dict[str, Any]) -> dict[str, Any]:
    """``OpenDataArena/MMFineReason*`` (one config per source, e.g. ``Euclid30K``,
    ``WeMath2-Standard``; split ``train``): ``id``, ``image``, ``question``, ``answer``,
    ``qwen3vl_235b_thinking_response`` (the privileged trace, kept verbatim), and in some
    configs ``solution`` and ``data_source``. Source: the dataset card's ``dataset_info``
    (huggingface.co/datasets/OpenDataArena/MMFineReason, README commits)."""
    return {
        "id": text(row.get("id")) or None,
        "question": text(row["question"]),
        "privileged": text(row.get("qwen3vl_235b_thinking_response")),
        "answer": text(row.get("answer")) or None,
        "images": image_list(row.get("image")),
        "meta": {"data_source": text(row.get("data_source"))},
    }


# ----------------------------------------------------------------------------- ViRL39K


def virl39k(row: dict[str, Any]) -> dict[str, Any]:
    """``TIGER-Lab/ViRL39K`` (``39Krelease.parquet``, 38,870 rows; images in ``images.zip``):
    ``question`` (with ``<image>`` placeholders), ``answer`` (always ``\\boxed{...}``; unboxed
    here), ``image`` (list of paths relative to the unzipped root, e.g.
    ``images/Processed-x.jpg``), ``qid``, ``category``, ``source``, ``PassRate_*``. Mirrors
    that renamed the columns (``problem``, ``images``, ``id``) load too. Answers only
    (``answer_only_v1``). Source: the dataset card ("Dataset Keys") and loaders that read
    ``39Krelease.parquet`` (VL-Rethinker and others on GitHub)."""
    return {
        "id": text(first_key(row, "qid", "id")) or None,
        "question": text(first_key(row, "question", "problem")),
        "privileged": "",
        "answer": unboxed(text(row.get("answer"))) or None,
        "images": image_list(first_key(row, "image", "images")),
        "meta": {"category": text(row.get("category"))},
    }


# ----------------------------------------------------------------------------- chat format

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant"}
_ROLES["gpt"] = "assistant"


def _content_text(content: Any) -> str:
    """A turn's content as text: a string as it is; a list of parts (TRL / OpenAI style) with
    text parts joined and each image part as an ``<image>`` placeholder."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "image":
            parts.append("<image>")
        elif isinstance(part, dict):
            parts.append(text(part.get("text")))
    return "".join(parts)


def messages(row: dict[str, Any]) -> dict[str, Any]:
    """Chat-format rows (ms-swift, LLaMA-Factory, TRL): ``messages`` (a list of
    ``{"role", "content"}`` turns; ShareGPT's ``conversations`` with ``{"from", "value"}`` works
    too), ``images`` (a list: paths relative to the data directory, or images), optional ``id``.
    ``<image>`` placeholders in the user turn place the images. The last user turn is the
    question and the final assistant turn the privileged trace (``opsd_teacher_v1``); a
    system turn is dropped (the templates own the instruction); rows with more than one
    user turn are skipped (counted): OPSD samples one completion per question. ms-swift's
    grounding ``objects`` (boxes per image) become the example's regions (:func:`swift_objects`).
    Source: ms-swift's custom dataset format (swift.readthedocs.io, Customization/Custom-dataset)
    and LLaMA-Factory's sharegpt format."""
    turns = first_key(row, "messages", "conversations") or []
    norm = []
    for turn in turns:
        role = _ROLES.get(text(first_key(turn, "role", "from")).lower())
        if role is None:
            raise RowSkip(f"unknown role {first_key(turn, 'role', 'from')!r} in messages")
        if role != "system":
            norm.append((role, _content_text(first_key(turn, "content", "value"))))
    if len(norm) < 2 or norm[-1][0] != "assistant" or norm[-2][0] != "user":
        raise RowSkip("messages do not end with a user turn followed by an assistant turn")
    if sum(1 for role, _ in norm if role == "user") > 1:
        raise RowSkip("multi-turn conversation (only single-turn rows are used)")
    return {
        "id": text(row.get("id")) or None,
        "question": norm[-2][1],
        "privileged": norm[-1][1],
        "answer": text(row.get("answer")) or None,
        "images": image_list(row.get("images")),
        "regions": swift_objects(row.get("objects")),
        "meta": {},
    }
