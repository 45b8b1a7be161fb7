"""Training data: rows from a hub id, a local file, a ``save_to_disk`` directory, or a synthetic
task, mapped to ``Example`` by a configurable column mapping, and iterated in a resumable,
shardable order.

Bad rows follow ``data.bad_row_policy``: ``skip`` (counted, logged with their ids) or ``raise``.
Image columns are carried through as-is (PIL, bytes, dicts or paths); decoding and validation
belong to the VL processor, which applies the image policy.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsd_mm.config import ColumnsConfig, DataConfig
from opsd_mm.types import Example

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data problem; the message names the source, the column or the example."""


# Column presets for known datasets (see shared BENCHMARKS.md, "Training data").
PRESETS: dict[str, ColumnsConfig] = {
    "opsd_math": ColumnsConfig(question="problem", privileged="solution", answer="Answer"),
    "mmfinereason": ColumnsConfig(
        question="question",
        privileged="qwen3vl_235b_thinking_response",
        answer="answer",
        images="image",
    ),
    "wemath2_sft": ColumnsConfig(
        question="question", privileged="response", answer="answer", images="image"
    ),
    # Answers only: the privileged information is the answer itself.
    "virl39k": ColumnsConfig(
        question="question", privileged="answer", answer="answer", images="image"
    ),
    "jsonl_images": ColumnsConfig(
        id="id", question="question", privileged="solution", answer="answer", images="images"
    ),
}

# Synthetic sources: name -> (n, seed) -> examples. The VL task registers lazily.
_SYNTHETIC: dict[str, Callable[..., list[Example]]] = {}


def _synthetic(name: str) -> Callable[..., list[Example]]:
    if not _SYNTHETIC:
        from opsd_mm.tasks import SYNTHETIC_TASKS

        _SYNTHETIC.update(SYNTHETIC_TASKS)
        try:
            from opsd_mm.fixtures.vl_tasks import make_vl_count_examples

            _SYNTHETIC["vl_count"] = make_vl_count_examples
        except ImportError:  # pragma: no cover - VL fixtures not installed
            pass
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
    path = Path(src)
    if src.startswith("synthetic:"):
        raise DataError("synthetic sources produce Examples directly; use load_examples")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(
                        f"data.split: '{cfg.split}' not in {path}; splits: {sorted(ds.keys())}"
                    )
                ds = ds[cfg.split]
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
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets' own errors do not name the file
            raise DataError(f"data.source: cannot read {path}: {type(e).__name__}: {e}") from e
    if path.exists():
        raise DataError(f"data.source: unsupported file type '{suffix}' ({path})")
    # A hub dataset id (needs the network; offline this fails with the hub's own error).
    return datasets.load_dataset(src, cfg.subset, split=cfg.split)


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


def _columns(cfg: DataConfig) -> ColumnsConfig:
    if cfg.preset is None:
        return cfg.columns
    if cfg.preset not in PRESETS:
        raise DataError(f"data.preset: unknown preset '{cfg.preset}'; available: {sorted(PRESETS)}")
    return PRESETS[cfg.preset]


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(v for v in value if v is not None)
    return (value,)


@dataclass
class LoadReport:
    """What loading did: rows kept and rows skipped with the reason and example id."""

    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def rows_to_examples(
    rows: Sequence[dict[str, Any]] | Any,
    columns: ColumnsConfig,
    *,
    policy: str = "skip",
    require_privileged: bool = True,
    source: str = "",
) -> tuple[list[Example], LoadReport]:
    """Map rows to Examples; bad rows are skipped (and reported) or raise, by ``policy``."""
    names = list(getattr(rows, "column_names", None) or (rows[0].keys() if len(rows) else []))
    if len(rows) == 0:
        raise DataError(f"data.source: {source or 'the dataset'} is empty (0 rows)")
    wanted = {
        "question": columns.question,
        "privileged": columns.privileged,
        "answer": columns.answer,
        "id": columns.id,
        "images": columns.images,
        "teacher_images": columns.teacher_images,
    }
    for field_name, col in wanted.items():
        if col is not None and col not in names:
            raise DataError(
                f"data.columns.{field_name}: column '{col}' not found in {source or 'the dataset'}; "
                f"available columns: {', '.join(names)}"
            )
    report = LoadReport()
    out: list[Example] = []
    for i, row in enumerate(rows):
        ex_id = str(row[columns.id]) if columns.id else f"row-{i}"
        question = row[columns.question]
        privileged = row[columns.privileged] if columns.privileged else ""
        problem = None
        if not isinstance(question, str) or not question.strip():
            problem = "missing question"
        elif require_privileged and (not isinstance(privileged, str) or not privileged.strip()):
            problem = "empty privileged trace"
        if problem:
            if policy == "raise":
                raise DataError(f"example '{ex_id}' ({source}): {problem}")
            report.skipped.append((ex_id, problem))
            continue
        answer = row[columns.answer] if columns.answer else None
        out.append(
            Example(
                id=ex_id,
                question=question,
                privileged=privileged if isinstance(privileged, str) else str(privileged or ""),
                answer=None if answer is None else str(answer),
                images=_as_tuple(row[columns.images]) if columns.images else (),
                teacher_images=_as_tuple(row[columns.teacher_images])
                if columns.teacher_images
                else (),
            )
        )
    report.kept = len(out)
    if report.skipped:
        shown = ", ".join(f"{i} ({why})" for i, why in report.skipped[:10])
        more = "" if len(report.skipped) <= 10 else f" and {len(report.skipped) - 10} more"
        log.warning("skipped %d bad rows: %s%s", len(report.skipped), shown, more)
    if not out:
        raise DataError(
            f"data.source: no usable rows in {source or 'the dataset'} "
            f"({len(report.skipped)} skipped as bad)"
        )
    return out, report


def load_examples(cfg: DataConfig, seed: int = 0) -> tuple[list[Example], LoadReport]:
    """All training Examples for ``cfg`` (limited to ``cfg.limit``), with a load report."""
    if cfg.source.startswith("synthetic:"):
        make = _synthetic(cfg.source.split(":", 1)[1])
        examples = make(cfg.synthetic_size, seed=seed)
        report = LoadReport(kept=len(examples))
    else:
        columns = _columns(cfg)
        rows = lazy_images(load_rows(cfg), [columns.images, columns.teacher_images])
        if cfg.limit is not None:
            rows = rows.select(range(min(cfg.limit, len(rows))))
        examples, report = rows_to_examples(
            rows,
            columns,
            policy=cfg.bad_row_policy,
            require_privileged=cfg.require_privileged,
            source=cfg.source,
        )
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    return examples, report


class ExampleStream:
    """Endless, resumable iteration over examples in seeded per-epoch order, sharded by rank.

    Each global batch takes ``batch_size * world_size`` consecutive positions of the epoch's
    permutation; rank r keeps its contiguous slice, so no example is duplicated or dropped
    within an epoch (the tail that does not fill a global batch is carried into the next
    epoch's order). ``state()``/``load_state()`` make resume exact.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not examples:
            raise DataError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.consumed = 0  # global positions consumed so far
        self._epoch = -1
        self._order: list[int] = []

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.examples))
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order[offset]

    def next_batch(self) -> list[Example]:
        start = self.consumed + self.rank * self.batch_size
        batch = [self.examples[self._index(start + j)] for j in range(self.batch_size)]
        self.consumed += self.batch_size * self.world_size
        return batch

    def state(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
