"""Dataset presets: ``data.preset=X data.source=PATH`` is all a user sets for a known dataset.

A preset carries what a run needs to know about a dataset besides its rows: the row mapper for
its real schema (``opsd_mm.data.preset_rows``), the split it ships in, and the teacher template its
privileged information fits (a reasoning trace -> ``opsd_teacher_v1``; an answer only ->
``answer_only_v1``; a knowledge principle -> ``hint_v1``). What rows must hold follows from the
teacher template: a template that shows ``{privileged}`` needs it, one that shows ``{answer}``
needs the answer, so an answer-only set never trips over an "empty privileged trace".

:func:`resolve_data` applies a preset to a ``RunConfig`` (the split when ``data.split`` is unset,
the teacher template while ``processor.teacher_template`` is at its default) and is called by the
CLI before anything loads, so the run's ``config.yaml`` records the resolved values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opsd_mm.config import ColumnsConfig, ConfigError, ProcessorConfig, RunConfig
from opsd_mm.data import preset_rows as rows

RowMapper = Callable[[dict[str, Any]], dict[str, Any]]

# What each teacher template shows besides the question, for callers that do not pass the
# template's own fields (the CLI does). processors/templates.py holds the text; a test keeps this
# table equal to the templates' placeholders.
TEMPLATE_NEEDS: dict[str, frozenset[str]] = {
    "opsd_teacher_v1": frozenset({"privileged"}),
    "answer_only_v1": frozenset({"answer"}),
    "hint_v1": frozenset({"privileged"}),
    "question_only_v1": frozenset(),
    "same_as_student": frozenset(),
}


@dataclass(frozen=True)
class Preset:
    """A known dataset: hub id, split, teacher template and the row mapper of its schema.

    ``requires`` lists the columns a source must have, each entry a tuple of alternatives (hub
    mirrors rename columns); ``columns_used`` is the human summary shown by ``data inspect`` and
    the table in docs/data.md.
    """

    name: str
    hub_id: str
    split: str
    teacher_template: str
    map_row: RowMapper
    requires: tuple[tuple[str, ...], ...]
    columns_used: str


def _preset(name, hub_id, split, template, mapper, requires, used) -> Preset:
    return Preset(name, hub_id, split, template, mapper, requires, used)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset(
            "opsd_math",
            "siyanzhao/Openthoughts_math_30k_opsd",
            "train",
            "opsd_teacher_v1",
            rows.opsd_math,
            (("problem",), ("solution",)),
            "problem -> question; solution -> privileged; Answer -> answer",
        ),
        _preset(
            "wemath2_standard",
            "We-Math/We-Math2.0-Standard",
            "standard",
            "hint_v1",
            rows.wemath2_standard,
            (("question",), ("principle",), ("image",)),
            "question; image; principle -> privileged (hint); answer; id",
        ),
        _preset(
            "wemath2_pro",
            "We-Math/We-Math2.0-Pro",
            "pro",
            "answer_only_v1",
            rows.wemath2_pro,
            (("question",), ("answer",), ("image",)),
            "question; image; answer; question_id -> id",
        ),
        _preset(
            "wemath2_sft",
            "We-Math/We-Math2.0-SFT (mathbook_sft.jsonl + images)",
            "train",
            "opsd_teacher_v1",
            rows.messages,
            (("messages", "conversations"),),
            "messages: last user turn -> question, final assistant turn -> privileged; images",
        ),
        _preset(
            "mathvision",
            "MathLLMs/MathVision",
            "test",
            "opsd_teacher_v1",
            rows.mathvision,
            (("question",), ("answer",), ("decoded_image", "image")),
            "question + options (official format); decoded_image or image; solution -> "
            "privileged; answer; id",
        ),
        _preset(
            "mmfinereason",
            "OpenDataArena/MMFineReason (config via data.subset)",
            "train",
            "opsd_teacher_v1",
            rows.mmfinereason,
            (("question",), ("qwen3vl_235b_thinking_response",), ("image",)),
            "question; image; qwen3vl_235b_thinking_response -> privileged; answer; id",
        ),
        _preset(
            "virl39k",
            "TIGER-Lab/ViRL39K (39Krelease.parquet + images.zip)",
            "train",
            "answer_only_v1",
            rows.virl39k,
            (("question", "problem"), ("answer",), ("image", "images")),
            "question (<image> placeholders); image (paths); answer (unboxed); qid -> id",
        ),
        _preset(
            "messages",
            "any chat-format set (ms-swift / LLaMA-Factory / TRL)",
            "train",
            "opsd_teacher_v1",
            rows.messages,
            (("messages", "conversations"),),
            "messages: last user turn -> question, final assistant turn -> privileged; images; "
            "objects (ms-swift grounding boxes) -> regions",
        ),
    )
}


def columns_preset(
    columns: ColumnsConfig, name: str = "columns", region_coords: str = "pixel"
) -> Preset:
    """A preset from a plain ``data.columns`` mapping (and the legacy ``jsonl_images``);
    ``region_coords`` is ``data.region_coords``, the units of ``data.columns.regions``."""

    def map_row(row: dict[str, Any]) -> dict[str, Any]:
        example_id = rows.text(row[columns.id]) if columns.id else None
        try:
            regions = rows.regions(row[columns.regions], region_coords) if columns.regions else ()
        except rows.RowSkip as skip:
            raise rows.RowSkip(str(skip), example_id) from skip
        return {
            "id": example_id,
            "question": row[columns.question],
            "privileged": row[columns.privileged] if columns.privileged else "",
            "answer": None
            if not columns.answer or row[columns.answer] is None
            else row[columns.answer],
            "images": rows.image_list(row[columns.images]) if columns.images else (),
            "teacher_images": rows.image_list(row[columns.teacher_images])
            if columns.teacher_images
            else (),
            "regions": regions,
            "meta": {},
        }

    mapped = {
        "id": columns.id,
        "question": columns.question,
        "privileged": columns.privileged,
        "answer": columns.answer,
        "images": columns.images,
        "teacher_images": columns.teacher_images,
        "regions": columns.regions,
    }
    used = "; ".join(f"{col} -> {f}" for f, col in mapped.items() if col)
    requires = tuple((col,) for col in mapped.values() if col)
    return Preset(name, "", "train", ProcessorConfig().teacher_template, map_row, requires, used)


# The legacy preset: JSONL with image paths in the plain column layout.
_JSONL_IMAGES = ColumnsConfig(
    id="id", question="question", privileged="solution", answer="answer", images="images"
)


def get_preset(name: str) -> Preset:
    """The preset ``name``; an unknown name is a config error listing the presets."""
    if name == "jsonl_images":
        return columns_preset(_JSONL_IMAGES, "jsonl_images")
    if name not in PRESETS:
        raise ConfigError(
            f"data.preset: unknown preset '{name}'; available: "
            f"{', '.join(sorted([*PRESETS, 'jsonl_images']))}"
        )
    return PRESETS[name]


def resolve_data(cfg: RunConfig) -> RunConfig:
    """Apply ``data.preset`` to the config: the split (when ``data.split`` is unset) and the
    teacher template (while ``processor.teacher_template`` is at its default); idempotent.

    Without a preset an unset split means ``train``. An unknown preset is an error here, before
    anything loads, whatever the source (synthetic included).
    """
    data, proc = cfg.data, cfg.processor
    preset = get_preset(data.preset) if data.preset else None
    split = data.split or (preset.split if preset else "train")
    if split != data.split:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(data, split=split))
    default_template = ProcessorConfig().teacher_template
    if preset and proc.teacher_template == default_template != preset.teacher_template:
        proc = dataclasses.replace(proc, teacher_template=preset.teacher_template)
        cfg = dataclasses.replace(cfg, processor=proc)
    return cfg
