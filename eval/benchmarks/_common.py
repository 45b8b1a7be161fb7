"""Loading and small helpers shared by the benchmark files.

A benchmark loads either from the hub (its canonical id, config and split) or, with
``data_dir``, from ``data_dir/<benchmark name>``: a directory written by
``datasets.Dataset.save_to_disk`` (or a ``DatasetDict`` holding the split) with the hub
dataset's columns. Rows are returned as a ``datasets.Dataset`` so images decode lazily, one item
at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.errors import UserError


class EvalError(UserError):
    """A problem with what an evaluation was given (a flag, a benchmark copy, a predictions or
    output file); the message names it. The command line prints it and exits 2."""

    kind = "eval error"


class ItemError(ValueError):
    """An item that cannot be prompted (e.g. a missing image); the runner records it and goes
    on."""


def load_rows(
    name: str,
    hub_id: str,
    split: str,
    data_dir: str | Path | None,
    configs: Sequence[str | None] = (None,),
) -> datasets.Dataset:
    """The benchmark's rows, from ``data_dir/name`` when given, else from the hub.

    Several ``configs`` (MMMU's 30 subjects) are concatenated in the given order.
    """
    if data_dir is not None:
        path = Path(data_dir) / name
        if not path.exists():
            raise EvalError(
                f"no local copy of benchmark '{name}' at {path}: expected a directory written by "
                f"datasets save_to_disk with the columns of {hub_id} (split '{split}')"
            )
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise EvalError(
                f"{path} (local copy of benchmark '{name}') is not a datasets save_to_disk "
                f"directory: {e}"
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise EvalError(f"{path} holds splits {list(ds)}, not '{split}' needed by '{name}'")
            ds = ds[split]
        return ds
    parts = [datasets.load_dataset(hub_id, c, split=split) for c in configs]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def without_image_decoding(ds: datasets.Dataset) -> datasets.Dataset:
    """The same rows with image columns left as bytes: scoring never needs pixels."""
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(feat, datasets.List) and isinstance(feat.feature, datasets.Image):
            ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
    return ds


def require_image(item_id: str, name: str, image: Any) -> Any:
    """``image`` itself, or an :class:`ItemError` naming the item and column when it is None."""
    if image is None:
        raise ItemError(f"item {item_id}: image column '{name}' is empty (missing image)")
    return image


def first(mapping: Mapping[str, Any], *keys: str) -> Any:
    """Value of the first present key (hub copies differ slightly in column names)."""
    for k in keys:
        if k in mapping:
            return mapping[k]
    raise KeyError(f"none of the columns {list(keys)} present; got {sorted(mapping)}")
