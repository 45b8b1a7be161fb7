"""Train/eval contamination: training rows whose question or image matches a benchmark item.

Why: the visual-math training sets (We-Math 2.0, MathVision-style collections, MMFineReason's
sources) are built from the same pools as MathVista, MathVision and We-Math, so a training run can
quietly see test items. Two cheap, explainable signals, each reported with the ids on both sides:

- **text**: questions are normalised (NFKC, lower case, ``<image N>`` tags removed, words and
  math symbols kept, punctuation and spacing dropped) and cut into word n-grams (``n=8``). The
  score is the share of the benchmark question's n-grams found in the training question: 1.0
  for the same question re-spaced or re-cased, or embedded in a longer prompt (options or a hint
  added). A benchmark question shorter than ``n`` words matches when it occurs whole, and only
  from ``MIN_WORDS`` words up (shorter ones are generic). On top, every number of the benchmark
  question must occur in the training question: the same template with other numbers ("a
  rectangle of width 7" vs "width 5") is another problem, not a leak.
- **image**: a 128-bit difference hash (``dhash``: 9x8 and 8x9 greyscale thumbnails, one bit
  per neighbour comparison, rows and columns) that survives re-encoding (PNG -> JPEG), resizing
  and mild colour changes; a match is a Hamming distance of at most ``max_distance``. Flat or
  nearly flat images (almost all bits equal) are not compared: every blank canvas looks alike.

Pure functions and one index class; the benchmarks' rows come in as :class:`ReferenceItem`
(``opsd_mm.eval.references`` builds them; the core does not import the evaluation package).
"""

from __future__ import annotations

import io
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

_TAG = re.compile(r"<\s*image\s*\d*\s*>", re.IGNORECASE)
_TOKEN = re.compile(r"[^\W_]+|[+\-*/=<>^]")
MIN_WORDS = 5


@dataclass(frozen=True)
class ReferenceItem:
    """One benchmark item: its question text and images (PIL, bytes, dicts or paths)."""

    benchmark: str
    item_id: str
    text: str
    images: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Match:
    """A training row that matches a benchmark item; ``score`` is the n-gram containment
    (text) or the Hamming distance in bits (image)."""

    train_id: str
    benchmark: str
    item_id: str
    kind: str
    score: float

    def describe(self) -> str:
        how = f"{self.score:.2f} of n-grams" if self.kind == "text" else f"{self.score:.0f} bits"
        return f"{self.kind} matches {self.benchmark} item {self.item_id} ({how})"


def tokens(text: str) -> list[str]:
    """Normalised word tokens of ``text`` (see the module docstring)."""
    text = _TAG.sub(" ", unicodedata.normalize("NFKC", text).lower())
    return _TOKEN.findall(text)


def ngrams(toks: Sequence[str], n: int = 8) -> frozenset[tuple[str, ...]]:
    """The word n-grams of a token list (empty when it is shorter than ``n``)."""
    return frozenset(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))


def numbers(toks: Sequence[str]) -> Counter:
    """The tokens holding a digit, counted (``7``, ``2x``, ``3.5`` splits into ``3``, ``5``)."""
    return Counter(t for t in toks if any(c.isdigit() for c in t))


def open_image(src: Any) -> Image.Image | None:
    """A PIL image from a PIL image, bytes, a ``{"bytes", "path"}`` dict or a path; None when
    it cannot be read (the VL processor reports bad images; here they just cannot match)."""
    try:
        if isinstance(src, Image.Image):
            return src
        if isinstance(src, dict):
            src = src.get("bytes") if src.get("bytes") is not None else src.get("path")
        if isinstance(src, (bytes, bytearray)):
            return Image.open(io.BytesIO(bytes(src)))
        if isinstance(src, (str, Path)) and Path(src).is_file():
            return Image.open(src)
    except (OSError, ValueError, SyntaxError):
        return None
    return None


def dhash(image: Image.Image, size: int = 8) -> np.ndarray:
    """128-bit difference hash as two uint64 words: horizontal then vertical gradients."""
    grey = image.convert("L")
    wide = np.asarray(grey.resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    tall = np.asarray(grey.resize((size, size + 1), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = [wide[:, 1:] > wide[:, :-1], tall[1:, :] > tall[:-1, :]]
    return np.array([np.packbits(b.ravel()).view(">u8")[0] for b in bits], dtype=np.uint64)


def is_flat(hash_2: np.ndarray) -> bool:
    """True for a hash with almost no structure (under 8 or over 120 of 128 bits set)."""
    ones = int(np.bitwise_count(hash_2).sum())
    return ones < 8 or ones > 120


class ContaminationIndex:
    """Benchmark items indexed by n-gram (inverted index) and by image hash (one array)."""

    def __init__(
        self,
        items: Iterable[ReferenceItem],
        n: int = 8,
        text_threshold: float = 0.5,
        max_distance: int = 10,
    ) -> None:
        self.n, self.text_threshold, self.max_distance = n, text_threshold, max_distance
        self.items: list[ReferenceItem] = list(items)
        self.sizes: list[int] = []
        self.numbers: list[Counter] = []
        self.by_gram: dict[tuple[str, ...], list[int]] = {}
        self.short: dict[tuple[str, ...], list[int]] = {}  # questions under n words, whole
        hashes, owners = [], []
        for idx, item in enumerate(self.items):
            toks = tokens(item.text)
            grams = ngrams(toks, n)
            self.sizes.append(len(grams))
            self.numbers.append(numbers(toks))
            for g in grams:
                self.by_gram.setdefault(g, []).append(idx)
            if MIN_WORDS <= len(toks) < n:
                self.short.setdefault(tuple(toks), []).append(idx)
            for src in item.images:
                h = image_hash(src)
                if h is not None:
                    hashes.append(h)
                    owners.append(idx)
        self.short_lengths = sorted({len(k) for k in self.short})
        self.hashes_M2 = np.array(hashes, dtype=np.uint64).reshape(-1, 2)
        self.owners_M = np.array(owners, dtype=np.int64)

    def text_matches(self, text: str) -> list[tuple[int, float]]:
        """(item index, score) of every item whose question this text contains (see the
        module docstring): n-gram share over the threshold, or a short question found whole;
        and the item's numbers all present."""
        toks = tokens(text)
        grams = ngrams(toks, self.n)
        shared = Counter(i for g in grams for i in self.by_gram.get(g, ()))
        scores = {i: c / self.sizes[i] for i, c in shared.items()}
        for length in self.short_lengths:
            for start in range(len(toks) - length + 1):
                for i in self.short.get(tuple(toks[start : start + length]), ()):
                    scores[i] = 1.0
        have = numbers(toks)
        out = [
            (i, s)
            for i, s in scores.items()
            if s >= self.text_threshold and not (self.numbers[i] - have)
        ]
        return sorted(out, key=lambda t: -t[1])

    def image_matches(self, images: Sequence[Any]) -> list[tuple[int, int]]:
        """(item index, Hamming distance) of every item with an image within the distance."""
        if not len(self.owners_M):
            return []
        best: dict[int, int] = {}
        for src in images:
            h = image_hash(src)
            if h is None:
                continue
            dist_M = np.bitwise_count(self.hashes_M2 ^ h[None, :]).sum(axis=1)
            for j in np.flatnonzero(dist_M <= self.max_distance):
                idx, d = int(self.owners_M[j]), int(dist_M[j])
                best[idx] = min(d, best.get(idx, d))
        return sorted(best.items(), key=lambda t: t[1])

    def matches(self, train_id: str, question: str, images: Sequence[Any] = ()) -> list[Match]:
        """Every benchmark item this training row matches, text matches first."""
        out = [
            Match(train_id, self.items[i].benchmark, self.items[i].item_id, "text", s)
            for i, s in self.text_matches(question)
        ]
        out += [
            Match(train_id, self.items[i].benchmark, self.items[i].item_id, "image", float(d))
            for i, d in self.image_matches(images)
        ]
        return out


def image_hash(src: Any) -> np.ndarray | None:
    """The image's hash, or None when it cannot be read or is flat."""
    image = open_image(src)
    if image is None:
        return None
    try:
        h = dhash(image)
    except (OSError, ValueError):
        return None
    return None if is_flat(h) else h


def find_contaminated(examples: Sequence[Any], index: ContaminationIndex) -> list[Match]:
    """All matches of ``examples`` (``opsd_mm.types.Example``: question, images and
    teacher-only images) against the index, in example order."""
    out: list[Match] = []
    for ex in examples:
        out += index.matches(ex.id, ex.question, (*ex.images, *ex.teacher_images))
    return out
