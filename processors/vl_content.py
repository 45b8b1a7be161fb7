"""Where images go in a vision-language user message: content parts from a template.

Images go where ``<image>`` / ``<image N>`` placeholders stand in the question (unreferenced ones
before the question text); teacher-only images go into the teacher prompt just before the
privileged text (after the question when the template has no ``{privileged}``). Pure functions
over an :class:`~opsd_mm.types.Example`; the processor renders the parts with the chat template.
Each image part names its slot (``("question", i)`` or ``("teacher", k)``), so that the
processor can put a question image's view - one image or several - in its place.
"""

from __future__ import annotations

import re
from typing import Any

from opsd_mm.types import Example

from .templates import PromptTemplate

# `<image>` takes the next unplaced image; `<image 2>` / `<image2>` takes the second image.
PLACEHOLDER = re.compile(r"<image(?:\s*(\d+))?>")
# Private-use sentinels marking where the question / privileged text go in a rendered template.
_Q, _P = "\ue000question\ue000", "\ue000privileged\ue000"


def merge_text(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent text parts joined, empty ones dropped (the chat template sees clean content)."""
    out: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "text":
            if not part["text"]:
                continue
            if out and out[-1]["type"] == "text":
                out[-1] = {"type": "text", "text": out[-1]["text"] + part["text"]}
                continue
        out.append(part)
    return out


def question_parts(ex: Example) -> list[dict[str, Any]]:
    """Content parts of the question with image parts at the placeholders (each image part
    carries its source under ``"src"`` until rendering). Unreferenced images go first; a
    placeholder repeating an already placed image stays text.

    ``ex.meta["image_placeholders"] = False`` keeps the question verbatim with every image
    first - for benchmarks whose tags are text (MathVision's ``<image2>`` refers to a panel
    of its one composite image)."""
    parts: list[dict[str, Any]] = []
    placed: list[int] = []
    pos = 0
    matches = PLACEHOLDER.finditer(ex.question) if ex.meta.get("image_placeholders", True) else ()
    for m in matches:
        if m.group(1) is not None:
            idx = int(m.group(1)) - 1
            if not 0 <= idx < len(ex.images):
                raise ValueError(
                    f"example '{ex.id}': question refers to {m.group(0)} but the example has "
                    f"{len(ex.images)} image(s)"
                )
        else:
            idx = next((i for i in range(len(ex.images)) if i not in placed), -1)
            if idx < 0:
                raise ValueError(
                    f"example '{ex.id}': question has more <image> placeholders than its "
                    f"{len(ex.images)} image(s)"
                )
        if idx in placed:
            continue
        parts.append({"type": "text", "text": ex.question[pos : m.start()]})
        parts.append({"type": "image", "src": ex.images[idx], "slot": ("question", idx)})
        placed.append(idx)
        pos = m.end()
    parts.append({"type": "text", "text": ex.question[pos:]})
    rest = [
        {"type": "image", "src": ex.images[i], "slot": ("question", i)}
        for i in range(len(ex.images))
        if i not in placed
    ]
    return rest + parts


def content(
    ex: Example, template: PromptTemplate, privileged: str, teacher_images: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The user message's content parts and its images (source objects, in prompt order).

    The template is rendered with sentinels for ``{question}`` and ``{privileged}``, which
    are then replaced by the question's parts and by [teacher images, privileged text]
    (teacher images follow the question when the template has no ``{privileged}``). Image
    parts keep their ``slot`` (see the module docstring); the sources are returned apart.
    """
    if "question" not in template.fields:
        raise ValueError(f"template '{template.name}' has no {{question}}: images need a place")
    q_parts = question_parts(ex)
    t_parts = (
        [
            {"type": "image", "src": im, "slot": ("teacher", k)}
            for k, im in enumerate(ex.teacher_images)
        ]
        if teacher_images
        else []
    )
    rendered = template.render(question=_Q, privileged=_P, answer=ex.answer)
    has_p = _P in rendered
    parts: list[dict[str, Any]] = []
    for piece in re.split(f"({_Q}|{_P})", rendered):
        if piece == _Q:
            parts.extend(q_parts + ([] if has_p else t_parts))
        elif piece == _P:
            parts.extend(t_parts + [{"type": "text", "text": privileged}])
        else:
            parts.append({"type": "text", "text": piece})
    images = [p.pop("src") for p in parts if p["type"] == "image"]
    return merge_text(parts), images
