"""``opsd-mm data inspect`` and ``opsd-mm data check``: what the student and teacher will see,
and which training rows match benchmark items.

Both load the data exactly as training does (:func:`load_training_data`, also used by the
trainer's set-up): preset resolution, row mapping, counted skips, image checks. Processors and the
benchmark loaders come in through :class:`DataWiring`, handed in by ``cli.py``, so this module,
like the rest of the core, imports neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_mm.config import RunConfig, load_config
from opsd_mm.config.sections import ViewOpConfig, view_is_random
from opsd_mm.data.contamination import ContaminationIndex, ReferenceItem, find_contaminated
from opsd_mm.data.load import LoadReport, load_examples, preset_for
from opsd_mm.data.presets import resolve_data
from opsd_mm.errors import ConfigError, UserError
from opsd_mm.types import Example, view_seed

log = logging.getLogger(__name__)


@dataclass
class DataWiring:
    """What the data commands need from outside the core. ``benchmark_names``: the benchmarks
    ``load_references`` knows (checked before any data loads)."""

    build_processor: Callable[[RunConfig], Any]
    template_fields: Callable[[str], frozenset[str]]
    load_references: Callable[[Sequence[str], str | None], list[ReferenceItem]]
    benchmark_names: Callable[[], Sequence[str]] = lambda: ()
    # With a model teacher or a teachers mapping: (cfg, the student's processor) -> a function
    # rendering an example's teacher context as its own teacher does (``meta["teacher"]`` names
    # it); None, or returning None: the student's processor renders it.
    teacher_prompts: Callable[[RunConfig, Any], Callable[[Example], Any] | None] | None = None


def check_benchmarks(names: Sequence[str], wiring: DataWiring, where: str) -> None:
    """A :class:`~opsd_mm.errors.UserError` (a ConfigError when ``where`` is a config key)
    naming the first of ``names`` that is not a known benchmark, and the known ones."""
    known = list(wiring.benchmark_names())
    for name in names:
        if known and name not in known:
            error = ConfigError if where.startswith("data.") else UserError
            raise error(f"{where}: unknown benchmark {name!r}; known: {', '.join(known)}")


def load_training_data(
    cfg: RunConfig, wiring: DataWiring, *, with_processor: bool = True, exclude: bool | None = None
) -> tuple[list[Example], LoadReport, Any]:
    """Examples as training sees them, the report and the processor (None without
    ``with_processor``): rows mapped and checked first (data errors come before any tokenizer or
    model loads), then images checked by the processor, then contaminated rows dropped when
    ``data.exclude_contaminated`` (or ``exclude``); every drop is counted in the report with its
    reason. ``cfg`` is resolved (``opsd_mm.data.presets.resolve_data``)."""
    exclude = cfg.data.exclude_contaminated if exclude is None else exclude
    if exclude:
        check_benchmarks(cfg.data.contamination_benchmarks, wiring, "data.contamination_benchmarks")
    fields = wiring.template_fields(cfg.processor.teacher_template)
    route_by = cfg.teacher.route_by if cfg.teachers else None
    examples, report = load_examples(
        cfg.data, seed=cfg.seed, teacher_fields=fields, route_by=route_by
    )
    processor = wiring.build_processor(cfg) if with_processor else None
    if processor is not None:  # a VL processor drops (and counts) rows with bad images
        examples = processor.prepare_examples(examples, data_dir=cfg.data.data_dir)
        for err in processor.bad_images:
            report.dropped.append((err.example_id, f"bad image: {err.source}: {err.reason}"))
    if exclude:
        refs = wiring.load_references(
            cfg.data.contamination_benchmarks, cfg.data.contamination_data_dir
        )
        matches = find_contaminated(examples, ContaminationIndex(refs))
        first = {}
        for m in matches:
            first.setdefault(m.train_id, m)
        for train_id, m in first.items():
            report.dropped.append((train_id, f"contaminated: {m.describe()}"))
        examples = [ex for ex in examples if ex.id not in first]
        log.warning(
            "data.exclude_contaminated: dropped %d of %d rows matching %s",
            len(first),
            len(examples) + len(first),
            ", ".join(cfg.data.contamination_benchmarks),
        )
    return examples, report, processor


def _config(args: argparse.Namespace) -> RunConfig:
    return resolve_data(load_config(args.config, list(args.overrides)))


def summary_lines(cfg: RunConfig, report: LoadReport, kept: int) -> list[str]:
    """The header of ``data inspect``: source, mapping, templates, counts, skips by reason."""
    d, p = cfg.data, cfg.processor
    lines = [f"source: {d.source}  (split {d.split}{', subset ' + d.subset if d.subset else ''})"]
    if d.source.startswith("synthetic:"):
        lines.append("columns: synthetic task (examples generated in-process)")
    else:
        preset = preset_for(d)
        origin = f"preset {preset.name}" if d.preset else "data.columns"
        lines.append(f"columns ({origin}): {preset.columns_used}")
        if d.preset:
            lines.append(f"preset hub id: {preset.hub_id}")
    lines.append(f"student template: {p.student_template}; teacher template: {p.teacher_template}")
    if p.student_view or p.teacher_view or p.gain_view is not None:
        lines.append(f"student view: {view_text(p.student_view)}")
        lines.append(f"teacher view: {view_text(p.teacher_view)}")
    if p.gain_view is not None:
        lines.append(f"gain view (the view gain's comparison): {view_text(p.gain_view)}")
    lines.append(
        f"rows: {report.rows} read, {report.kept} mapped, {kept} kept "
        f"({len(report.skipped)} skipped, {len(report.dropped)} dropped after mapping)"
    )
    for reason, count in sorted(report.reasons().items(), key=lambda t: -t[1]):
        lines.append(f"  {count} x {reason}")
    for ex_id, why in (report.skipped + report.dropped)[:10]:
        lines.append(f"    e.g. {ex_id}: {why}")
    return lines


def view_text(ops: Sequence[ViewOpConfig]) -> str:
    """A view as one line: ``zoom(margin=0.1, placement=extra), mark`` (``-``: none)."""
    parts = []
    for op in ops:
        keys = [f"{k}={v}" for k, v in vars(op).items() if k != "op" and v is not None]
        parts.append(f"{op.op}({', '.join(keys)})" if keys else op.op)
    return ", ".join(parts) or "-"


def write_images(prompt: Any, folder: Path, stem: str) -> list[str]:
    """The prompt's images as they were encoded (after the view and the final resize), as
    ``folder/stem_N.png``; their paths."""
    paths = []
    for i, img in enumerate(prompt.images):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}_{i + 1}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def render_prompt(prompt: Any) -> list[str]:
    """A prompt's text with each image's token count: the prompt's image tokens
    (``meta["image_tokens"]``) shared out in proportion to the images' vision grids (each
    image's t*h*w / merge**2, the merge factor being the same for every image)."""
    grid = prompt.mm_inputs.get("image_grid_thw") if prompt.mm_inputs else None
    lines = [prompt.text]
    if grid is not None:
        patches = grid.tolist()
        total = sum(g[0] * g[1] * g[2] for g in patches)
        n_tokens = int(prompt.meta.get("image_tokens", total))
        for i, g in enumerate(patches):
            size = ""
            if i < len(prompt.images):
                size = f"{prompt.images[i].width}x{prompt.images[i].height} -> "
            lines.append(
                f"[image {i + 1}: {size}grid {g} -> {g[0] * g[1] * g[2] * n_tokens // total} tokens]"
            )
    return lines


def _teacher_prompt(render: Callable[[Example], Any], ex: Example) -> Any:
    """``render(ex)``, or, for an example no teacher is routed to, the reason (a string)."""
    try:
        return render(ex)
    except ValueError as e:
        if getattr(e, "skip_reason", None) != "unrouted":
            raise
        return str(e)


def cmd_inspect(args: argparse.Namespace, wiring: DataWiring) -> int:
    cfg = _config(args)
    examples, report, processor = load_training_data(cfg, wiring)
    lines = [f"config: {args.config} {' '.join(args.overrides)}".rstrip()]
    lines += summary_lines(cfg, report, len(examples))
    # A random student view is drawn as training's first step would draw it.
    random_view = view_is_random(cfg.processor.student_view)
    if random_view:
        lines.append("student view: random operations drawn as at training step 1")
    # A model teacher renders its context itself (its chat template, its image processing).
    teacher_prompt = wiring.teacher_prompts(cfg, processor) if wiring.teacher_prompts else None
    rendered = [
        (
            ex,
            processor.student_prompt(ex, seed=view_seed(cfg.seed, 1, ex.id))
            if random_view
            else processor.student_prompt(ex),
            _teacher_prompt(teacher_prompt or processor.teacher_prompt, ex),
        )
        for ex in examples[: args.n]
    ]
    if rendered and rendered[0][0].images and not rendered[0][1].mm_inputs:
        lines.append("NOTE: examples carry images but the model is text-only: images are ignored")
    out = Path(args.output or Path(cfg.run_dir) / "data_inspect.txt")
    image_dir = out.with_name(f"{out.stem}_images")
    for old in image_dir.glob("[0-9][0-9][0-9]_*_[0-9]*.png"):  # an earlier inspect's images
        old.unlink()
    for k, (ex, student, teacher) in enumerate(rendered):
        lines.append(f"\n==== example {k + 1}/{min(args.n, len(examples))}: {ex.id} ====")
        for role, prompt in (("student", student), ("teacher", teacher)):
            if isinstance(prompt, str):  # no teacher: the reason
                lines.append(f"---- {role} prompt: none ({prompt}) ----")
                continue
            name = f"{prompt.meta['teacher']}, " if "teacher" in prompt.meta else ""
            lines.append(f"---- {role} prompt ({name}{len(prompt.input_ids)} tokens) ----")
            lines += render_prompt(prompt)
            files = write_images(prompt, image_dir, f"{k + 1:03d}_{role}")
            if files:
                lines.append(f"[{role} images as encoded: {', '.join(files)}]")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text + f"(written to {out})")
    return 0


def cmd_check(args: argparse.Namespace, wiring: DataWiring) -> int:
    cfg = _config(args)
    against = [n.strip() for n in (args.against or "").split(",") if n.strip()]
    names = against or cfg.data.contamination_benchmarks
    check_benchmarks(
        names, wiring, "data check --against" if against else "data.contamination_benchmarks"
    )
    data_dir = args.data_dir or cfg.data.contamination_data_dir
    examples, report, _ = load_training_data(cfg, wiring, with_processor=False, exclude=False)
    refs = wiring.load_references(names, data_dir)
    index = ContaminationIndex(
        refs, n=args.ngram, text_threshold=args.text_threshold, max_distance=args.max_distance
    )
    matches = find_contaminated(examples, index)
    counts = {n: sum(r.benchmark == n for r in refs) for n in names}
    rows = {m.train_id for m in matches}
    lines = [
        f"checked {len(examples)} training rows of {cfg.data.source} against "
        + ", ".join(f"{n} ({c} items)" for n, c in counts.items()),
        f"contaminated rows: {len(rows)} "
        f"(text matches {sum(m.kind == 'text' for m in matches)}, "
        f"image matches {sum(m.kind == 'image' for m in matches)})",
    ]
    lines += [f"  {m.train_id} -> {m.describe()}" for m in matches]
    out = Path(args.output or Path(cfg.run_dir) / "data_check.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(m.__dict__) + "\n" for m in matches))
    print("\n".join(lines) + f"\n(matches written to {out}; drop them at load with "
          "data.exclude_contaminated=true)")  # fmt: skip
    return 0


# ``data check``'s numeric flags. Out of range they silently mean nothing useful: an n-gram of
# 0 words or a threshold of 0 matches every row, a negative one or a distance under 0 none, a
# distance of 128 every image. argparse turns the ArgumentTypeError into "argument FLAG: ...".


def _ngram(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 128:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 128], got {text!r}")
    return value


def add_data_parser(sub: Any, run: Callable[[str, argparse.Namespace], int]) -> None:
    """``opsd-mm data inspect|check``; ``run(command, args)`` is the CLI's wired handler."""
    data = sub.add_parser("data", help="inspect training data; check it against benchmarks")
    cmds = data.add_subparsers(dest="data_command", required=True)
    inspect = cmds.add_parser(
        "inspect",
        help="load the data as training would; print counts, skips and rendered prompts",
    )
    check = cmds.add_parser(
        "check", help="report training rows whose question or image matches a benchmark item"
    )
    for p in (inspect, check):
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        p.add_argument("--output", help="file to write (default: RUN_DIR/data_*.txt|jsonl)")
    inspect.add_argument("--n", type=int, default=3, help="examples to render (default 3)")
    check.add_argument("--against", help="benchmarks, comma-separated (default: config's list)")
    check.add_argument("--data-dir", help="local save_to_disk copies named after the benchmarks")
    check.add_argument(
        "--ngram", type=_ngram, default=8, help="word n-gram length, >= 1 (default 8)"
    )
    check.add_argument(
        "--text-threshold",
        type=_share,
        default=0.5,
        help="the share of a benchmark question's n-grams that makes a match, in (0, 1] (0.5)",
    )
    check.add_argument(
        "--max-distance",
        type=_bits,
        default=10,
        help="image hash bits (of 128) that may differ in a match, in [0, 128] (10)",
    )
    inspect.set_defaults(func=lambda a: run("inspect", a))
    check.set_defaults(func=lambda a: run("check", a))
