"""Relative image paths of training rows: resolved and checked at load, before any model loads.

Why here and not only in the VL processor (which validates pixels later): a wrong base directory
makes every row fail, and the user must learn that at once, with the directory that was searched
and the key that sets it, not after minutes of model loading. Paths resolve against
``data.data_dir``, or, when it is unset, the directory of ``data.source`` (a JSONL next to its
``images/`` folder, a ``save_to_disk`` directory); the working directory is tried last. Found
paths become absolute, so nothing later depends on the base directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def image_base(source: str, data_dir: str | None) -> tuple[Path | None, str]:
    """(directory relative image paths resolve against, how the user sets it, in words)."""
    if data_dir is not None:
        return Path(data_dir), f"data.data_dir={data_dir}"
    path = Path(source)
    if source.startswith("synthetic:") or not path.exists():
        return None, "the working directory (data.data_dir unset)"
    base = path if path.is_dir() else path.parent
    return base, f"the directory of data.source, {base} (data.data_dir unset)"


def _is_local_path(text: str) -> bool:
    return not text.startswith(("http://", "https://"))


def _find(text: str, base: Path | None) -> Path | None:
    text = text[len("file://") :] if text.startswith("file://") else text
    path = Path(text)
    if path.is_absolute():
        return path if path.is_file() else None
    for root in (base, Path.cwd()):
        if root is not None and (root / path).is_file():
            return (root / path).resolve()
    return None


def resolve_images(
    images: tuple[Any, ...], base: Path | None
) -> tuple[tuple[Any, ...], str | None]:
    """``images`` with local paths made absolute, or the first missing path (as written)."""
    out = []
    for src in images:
        if isinstance(src, (str, os.PathLike)) and _is_local_path(str(src)):
            found = _find(str(src), base)
            if found is None:
                return images, str(src)
            out.append(str(found))
        elif isinstance(src, dict) and src.get("bytes") is None and src.get("path"):
            found = _find(str(src["path"]), base)
            if found is None:
                return images, str(src["path"])
            out.append({**src, "path": str(found)})
        else:
            out.append(src)
    return tuple(out), None


def missing_image_message(example_id: str, path: str, base: Path | None, how: str) -> str:
    where = f"{base}" if base is not None else "the working directory"
    return (
        f"example '{example_id}': image '{path}' not found (looked in {where}"
        f"{' and the working directory' if base is not None else ''}). Relative image paths "
        f"resolve against {how}; set data.data_dir=DIR to the folder the image paths are "
        "relative to (e.g. where images.zip was unpacked)"
    )
