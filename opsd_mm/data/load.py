"""Training data: rows from a hub id, a local file, a ``save_to_disk`` directory, or a synthetic
task, mapped to ``Example`` by a dataset preset (``opsd_mm.data.presets``) or a column mapping, and
iterated in a resumable, shardable order.

Bad rows follow ``data.bad_row_policy``: ``skip`` (counted, logged with their ids) or ``raise``.
Relative image paths are resolved and checked here (``opsd_mm.data.images``); otherwise image
columns are carried through as-is (PIL, bytes, dicts or paths): decoding and validation belong
to the VL processor, which applies the image policy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsd_mm.config import ColumnsConfig, ConfigError, DataConfig
from opsd_mm.data import images as data_images
from opsd_mm.data.preset_rows import RowSkip
from opsd_mm.data.presets import TEMPLATE_NEEDS, Preset, columns_preset, get_preset
from opsd_mm.errors import UserError
from opsd_mm.types import Example

log = logging.getLogger(__name__)


class DataError(UserError):
    """A data problem; the message names the source, the column or the example."""

    kind = "data error"


# Synthetic sources: name -> (n, seed) -> examples. The VL task registers lazily.
_SYNTHETIC: dict[str, Callable[..., list[Example]]] = {}


def _synthetic(name: str) -> Callable[..., list[Example]]:
    if not _SYNTHETIC:
        from opsd_mm.data.tasks import SYNTHETIC_TASKS

        _SYNTHETIC.update(SYNTHETIC_TASKS)
        from opsd_mm.data.vl_tasks import make_vl_count_examples

        _SYNTHETIC["vl_count"] = make_vl_count_examples
    if name not in _SYNTHETIC:
        raise DataError(
            f"data.source: unknown synthetic task 'synthetic:{name}'; "
            f"available: {sorted('synthetic:' + k for k in _SYNTHETIC)}"
        )
    return _SYNTHETIC[name]


def load_rows(cfg: DataConfig) -> Any:
    """Load the raw rows as a ``datasets.Dataset`` (or a list for synthetic sources)."""
    import datasets

    src = cfg.source
    split = cfg.split or (preset_for(cfg).split if cfg.preset else "train")
    path = Path(src)
    if src.startswith("synthetic:"):
        raise DataError("synthetic sources produce Examples directly; use load_examples")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        f"data.split: '{split}' not in {path}; splits: {sorted(ds.keys())}. "
                        f"Set data.split to one of them (e.g. data.split={sorted(ds.keys())[0]})"
                    )
                ds = ds[split]
            return ds
        raise DataError(
            f"data.source: {path} is a directory but not a datasets.save_to_disk directory"
        )
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise DataError(f"data.source: file not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"data.source: {path} is empty (0 rows)")
        builder = "parquet" if suffix == ".parquet" else "json"
        quiet = logging.getLogger("datasets")  # it logs the failure with a traceback; we say it
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets' own errors do not name the file or the line
            where = locate_json_error(path) if builder == "json" else None
            raise DataError(
                f"data.source: {where}"
                if where
                else f"data.source: cannot read {path}: {type(e).__name__}: {e}"
            ) from e
        finally:
            quiet.setLevel(level)
    if path.exists():
        raise DataError(f"data.source: unsupported file type '{suffix}' ({path})")
    # A hub dataset id (needs the network; offline this fails with the hub's own error).
    try:
        return datasets.load_dataset(src, cfg.subset, split=split)
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise DataError(f"data.split: {e} (source {src}). Set data.split to one of them") from e


def locate_json_error(path: Path) -> str | None:
    """Where a JSON / JSON Lines file is broken, as ``PATH, line N: what`` (the first line that
    is not UTF-8, not JSON, or not an object), or None when every line reads. Only called after
    a failure: ``datasets`` names neither the file nor the line, and reads undecodable text
    without complaint until a row is accessed."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head[:1] == b"[":  # one JSON document (a list of rows), not JSON Lines
        data = path.read_bytes()
        try:
            json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            return f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})"
        except json.JSONDecodeError as e:
            return f"{path}, line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}"
        return None
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{path}, line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8"
                )
            try:
                row = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                return f"{path}, line {n}, column {e.colno}: not valid JSON: {e.msg}"
            if not isinstance(row, dict):
                return f"{path}, line {n}: a JSON Lines row must be an object, got {text[:60]!r}"
    return None


def lazy_images(ds: Any, columns: Sequence[str | None]) -> Any:
    """Keep image columns undecoded ({"bytes", "path"} dicts) so that loading a large dataset
    does not decode and hold every image; the VL processor decodes (and validates) per example."""
    import datasets

    for col in columns:
        if col is None or col not in getattr(ds, "features", {}):
            continue
        feat = ds.features[col]
        inner = feat[0] if isinstance(feat, list) else getattr(feat, "feature", None)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image):  # a list of images per row
            ds = ds.cast_column(col, datasets.Sequence(datasets.Image(decode=False)))
    return ds


def preset_for(cfg: DataConfig) -> Preset:
    """The row mapping of ``cfg``: its preset, or the plain ``data.columns`` mapping."""
    try:
        if cfg.preset:
            return get_preset(cfg.preset)
        return columns_preset(cfg.columns, region_coords=cfg.region_coords)
    except ConfigError as e:
        raise DataError(str(e)) from e


@dataclass
class LoadReport:
    """What loading did: rows read, rows kept, rows skipped with the reason and example id, and
    (filled in by the CLI) rows dropped later for bad images or benchmark contamination."""

    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        """Skip and drop counts by reason (paths and ids folded out of the reason)."""
        counts: dict[str, int] = {}
        for _, why in self.skipped + self.dropped:
            key = why.split(":", 1)[0]
            counts[key] = counts.get(key, 0) + 1
        return counts


def _check_columns(names: Sequence[str], preset: Preset, source: str) -> None:
    for alternatives in preset.requires:
        if not any(a in names for a in alternatives):
            wanted = " or ".join(f"'{a}'" for a in alternatives)
            key = (
                f"data.preset={preset.name}"
                if preset.name != "columns"
                else f"data.columns.{_field_of(preset, alternatives[0])}"
            )
            raise DataError(
                f"{key}: column {wanted} not found in {source or 'the dataset'}; "
                f"available columns: {', '.join(names)}"
            )


def _field_of(preset: Preset, column: str) -> str:
    for part in preset.columns_used.split("; "):
        col, _, name = part.partition(" -> ")
        if col == column:
            return name
    return column


def rows_to_examples(
    rows: Sequence[dict[str, Any]] | Any,
    columns: ColumnsConfig | Preset,
    *,
    policy: str = "skip",
    require_privileged: bool = True,
    require_answer: bool = False,
    source: str = "",
    image_base: tuple[Path | None, str] | None = None,
    keep_columns: Sequence[str] = (),
) -> tuple[list[Example], LoadReport]:
    """Map rows to Examples through a preset (or a column mapping); bad rows are skipped (and
    reported) or raise, by ``policy``. With ``image_base`` (directory, how it is set), relative
    image paths are resolved and checked here: a missing image skips its row, and when no row's
    images are found the error says where it looked and names ``data.data_dir``.
    ``keep_columns``: raw columns copied into ``Example.meta`` under their own names (where the
    mapping did not set that key), e.g. the ``teacher.route_by`` column."""
    preset = columns if isinstance(columns, Preset) else columns_preset(columns)
    names = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    if len(rows) == 0:
        raise DataError(f"data.source: {source or 'the dataset'} is empty (0 rows)")
    _check_columns(names, preset, source)
    report = LoadReport(rows=len(rows))
    out: list[Example] = []
    first_missing = None
    for i, row in enumerate(rows):
        ex_id = f"row-{i}"
        try:
            fields = preset.map_row(dict(row))
            ex_id = str(fields.get("id") or ex_id)
            _validate(fields, require_privileged, require_answer)
            images = tuple(fields["images"])
            teacher_images = tuple(fields.get("teacher_images", ()))
            if image_base is not None:
                images, missing = data_images.resolve_images(images, image_base[0])
                if missing is None:
                    teacher_images, missing = data_images.resolve_images(
                        teacher_images, image_base[0]
                    )
                if missing is not None:
                    first_missing = first_missing or (ex_id, missing)
                    raise RowSkip(f"image not found: {missing}")
        except RowSkip as skip:
            ex_id = skip.example_id or ex_id
            if policy == "raise":
                if str(skip).startswith("image not found") and image_base is not None:
                    msg = data_images.missing_image_message(ex_id, missing, *image_base)
                    raise DataError(msg) from skip
                raise DataError(f"example '{ex_id}' ({source}): {skip}") from skip
            report.skipped.append((ex_id, str(skip)))
            continue
        answer = fields.get("answer")
        out.append(
            Example(
                id=ex_id,
                question=fields["question"],
                privileged=_as_text(fields.get("privileged")),
                answer=None if answer is None else str(answer),
                images=images,
                teacher_images=teacher_images,
                meta=_with_columns(fields.get("meta"), row, keep_columns),
                regions=tuple(fields.get("regions") or ()),
            )
        )
    report.kept = len(out)
    if report.skipped:
        shown = ", ".join(f"{i} ({why})" for i, why in report.skipped[:10])
        more = "" if len(report.skipped) <= 10 else f" and {len(report.skipped) - 10} more"
        log.warning("skipped %d bad rows: %s%s", len(report.skipped), shown, more)
    if not out:
        if first_missing is not None and image_base is not None:
            raise DataError(data_images.missing_image_message(*first_missing, *image_base))
        why = ", ".join(f"{n} x {r}" for r, n in report.reasons().items())
        raise DataError(
            f"data.source: no usable rows in {source or 'the dataset'} "
            f"({len(report.skipped)} skipped as bad: {why})"
        )
    return out, report


def _with_columns(meta: Any, row: Any, columns: Sequence[str]) -> dict[str, Any]:
    """The mapped meta plus each of ``columns`` the raw row has (the mapping's own key wins)."""
    out = dict(meta or {})
    for col in columns:
        if col not in out and col in row:
            out[col] = row[col]
    return out


def check_route_column(examples: Sequence[Example], column: str, source: str) -> None:
    """A DataError naming ``teacher.route_by`` when no example carries ``column`` (a
    misspelt column would otherwise skip, or default, every example)."""
    if examples and not any(ex.meta.get(column) is not None for ex in examples):
        keys = sorted({k for ex in examples[:100] for k in ex.meta})
        raise DataError(
            f"teacher.route_by={column}: no example of {source or 'the data'} has a value for it; "
            f"the examples' columns besides the mapped fields: {', '.join(keys) or 'none'}"
        )


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value or "")


def _validate(fields: dict[str, Any], require_privileged: bool, require_answer: bool) -> None:
    question, privileged = fields.get("question"), fields.get("privileged")
    if not isinstance(question, str) or not question.strip():
        raise RowSkip("missing question")
    if require_privileged and (not isinstance(privileged, str) or not privileged.strip()):
        raise RowSkip("empty privileged trace")
    answer = fields.get("answer")
    if require_answer and (answer is None or not str(answer).strip()):
        raise RowSkip("missing answer (the teacher template shows it)")


def load_examples(
    cfg: DataConfig,
    seed: int = 0,
    *,
    teacher_fields: frozenset[str] | None = None,
    route_by: str | None = None,
) -> tuple[list[Example], LoadReport]:
    """All training Examples for ``cfg`` (limited to ``cfg.limit``), with a load report.

    ``teacher_fields``: the placeholders of the run's teacher template (the CLI passes them);
    rows must hold what it shows (``data.require_privileged`` overrides the privileged part).
    Without it, the preset's template decides. ``route_by``: the ``teacher.route_by`` column,
    kept in each example's meta and required of at least one.
    """
    if cfg.preset:
        preset_for(cfg)  # an unknown preset is an error whatever the source
    if cfg.source.startswith("synthetic:"):
        make = _synthetic(cfg.source.split(":", 1)[1])
        examples = make(cfg.synthetic_size, seed=seed)
        report = LoadReport(kept=len(examples), rows=len(examples))
    else:
        preset = preset_for(cfg)
        needs = teacher_fields
        if needs is None:
            needs = TEMPLATE_NEEDS.get(preset.teacher_template, frozenset({"privileged"}))
        require_priv = (
            "privileged" in needs if cfg.require_privileged is None else cfg.require_privileged
        )
        rows = load_rows(cfg)
        rows = lazy_images(rows, [c for c in getattr(rows, "column_names", []) or []])
        if cfg.limit is not None:
            rows = rows.select(range(min(cfg.limit, len(rows))))
        try:
            examples, report = rows_to_examples(
                rows,
                preset,
                policy=cfg.bad_row_policy,
                require_privileged=require_priv,
                require_answer="answer" in needs,
                source=cfg.source,
                image_base=data_images.image_base(cfg.source, cfg.data_dir),
                keep_columns=[route_by] if route_by else [],
            )
        except UnicodeDecodeError as e:  # undecodable text surfaces when a row is read
            path = Path(cfg.source)
            where = locate_json_error(path) if path.suffix.lower() in (".json", ".jsonl") else None
            raise DataError(f"data.source: {where or f'{cfg.source}: not UTF-8 text ({e})'}") from e
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    if route_by:
        check_route_column(examples, route_by, cfg.source)
    return examples, report
