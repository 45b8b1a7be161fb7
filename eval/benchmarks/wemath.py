"""We-Math testmini (1,740 rows = 525 composite problems), official rule and 4-D metrics.

Prompt (We-Math's inference scripts, without their source-code indentation): ``Now, we require
you to solve a multiple-choice math question. Please briefly describe your thought process and
provide the final answer(option).\\nQuestion: {question}\\nOption: {option}\\nRegarding the
format, please answer following the template below, and be sure to include two <> symbols:\\n
<Thought process>: <<your thought process>> <Answer>: <<your option>>``.

Per row (official, ``rule: official``): the text after the last ``Answer``, stripped, with
``> < : .`` deleted, first character if in A-H; correct iff equal to the gold letter. Fallback for
models that ignore the template (``rule: fallback:boxed``, NON-OFFICIAL): the first letter of the
last ``\\boxed{}``. Records keep both verdicts: ``correct`` is the official one,
``correct_with_fallback`` the other; the summary reports the official metrics and, separately
labelled, the same metrics with the fallback.

Four-dimensional metrics over composites (sub-problems ``{k}steps_i`` plus ``{k}steps_multi``
sharing an ``ID``), following four_dimensional_metrics.py: IK (some sub wrong, composite wrong),
IG (all subs right, composite wrong), CM strict (all right) / loose (any sub right, composite
right), RM strict (some sub wrong, composite right) / loose (all subs wrong, composite right);
score = (N - 0.5 IG - RM - IK) / N with N the number of complete composites counted, not a
hard-coded 525; RM rate = RM / (CM + RM). S1 is sub-problem accuracy, S2/S3 composite accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import grading, metrics
from opsd_mm.eval.benchmarks._common import load_rows, require_image
from opsd_mm.types import Example

TEMPLATE = (
    "Now, we require you to solve a multiple-choice math question. Please briefly describe your "
    "thought process and provide the final answer(option).\nQuestion: {question}\nOption: "
    "{option}\nRegarding the format, please answer following the template below, and be sure to "
    "include two <> symbols:\n<Thought process>: <<your thought process>> <Answer>: <<your "
    "option>>"
)


def official_letter(response: str) -> str | None:
    """The official per-row extraction (None when it yields no letter A-H)."""
    tail = re.sub(r"[><:.]", "", response.split("Answer")[-1].strip()).strip()
    return tail[0] if tail and tail[0] in "ABCDEFGH" else None


def fallback_letter(response: str) -> str | None:
    """Non-official fallback: first character of the last ``\\boxed{}`` if it is A-H."""
    boxed = grading.last_boxed(response)
    boxed = (boxed or "").strip()
    return boxed[0] if boxed and boxed[0] in "ABCDEFGH" else None


def four_dimensional(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """4-D metrics from per-row verdicts ``{"ID", "key", "correct"}`` (one sample).

    A composite counts only when its sub-problems and its ``multi`` row are all present.
    """
    groups: dict[tuple[int, str], dict[str, bool]] = {}
    for r in rows:
        m = re.fullmatch(r"(\d)steps_(\w+)", r["key"])
        if m:
            groups.setdefault((int(m.group(1)), str(r["ID"])), {})[m.group(2)] = r["correct"]
    comp = {2: [], 3: []}  # steps -> [(subs, multi)]
    for (steps, _), got in sorted(groups.items()):
        subs = [got.get(str(i)) for i in range(1, steps + 1)]
        if "multi" in got and None not in subs and steps in comp:
            comp[steps].append((subs, got["multi"]))
    allc = comp[2] + comp[3]
    n = len(allc)
    c = {
        "IK": sum(not all(s) and not m for s, m in allc),
        "IG": sum(all(s) and not m for s, m in allc),
        "CM_strict": sum(all(s) and m for s, m in allc),
        "CM_loose": sum(any(s) and m for s, m in allc),
        "RM_strict": sum(not all(s) and m for s, m in allc),
        "RM_loose": sum(not any(s) and m for s, m in allc),
    }

    def rate(num: float, den: float) -> float:
        return num / den if den else 0.0

    subs_flat = [x for s, _ in allc for x in s]
    return {
        "n_composites": n,
        "counts": c,
        "score_strict": rate(n - 0.5 * c["IG"] - c["RM_strict"] - c["IK"], n),
        "score_loose": rate(n - 0.5 * c["IG"] - c["RM_loose"] - c["IK"], n),
        "IK_rate": rate(c["IK"], n),
        "IG_rate": rate(c["IG"], n),
        "CM_strict_rate": rate(c["CM_strict"], n),
        "CM_loose_rate": rate(c["CM_loose"], n),
        "RM_strict_rate": rate(c["RM_strict"], c["CM_strict"] + c["RM_strict"]),
        "RM_loose_rate": rate(c["RM_loose"], c["CM_loose"] + c["RM_loose"]),
        "S1": rate(sum(subs_flat), len(subs_flat)),
        "S2": rate(sum(m for _, m in comp[2]), len(comp[2])),
        "S3": rate(sum(m for _, m in comp[3]), len(comp[3])),
    }


def _mean_dicts(ds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Average of equally-shaped metric dicts (one per sample index)."""
    out: dict[str, Any] = {}
    for k, v in ds[0].items():
        out[k] = (
            _mean_dicts([d[k] for d in ds])
            if isinstance(v, dict)
            else (sum(d[k] for d in ds) / len(ds))
        )
    return out


class WeMath:
    hub_id = "We-Math/We-Math"
    headline = ("score_strict", "score_loose", "accuracy")
    id_columns = ("ID", "key")
    label = "official (We-Math per-row rule and four_dimensional_metrics)"

    def __init__(self, name: str = "wemath", split: str = "testmini") -> None:
        self.name, self.split = name, split

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset:
        return load_rows(self.name, self.hub_id, self.split, data_dir)

    def item_id(self, item: dict[str, Any]) -> str:
        return f"{item['ID']}:{item['key']}"

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"ID": str(item["ID"]), "key": item["key"]}

    def prompt(self, item: dict[str, Any]) -> Example:
        iid = self.item_id(item)
        image = require_image(iid, "image_path", item.get("image_path"))
        return Example(
            id=iid,
            question=TEMPLATE.format(question=item["question"], option=item["option"]),
            answer=str(item["answer"]),
            images=(image,),
            meta={"benchmark": self.name, **self.categories(item)},
        )

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        gold = str(item["answer"]).strip()
        letter = official_letter(response)
        rule = "official"
        if letter is None:
            letter = fallback_letter(response)
            rule = "fallback:boxed" if letter is not None else "none"
        return {
            "correct": rule == "official" and letter == gold,
            "correct_with_fallback": letter == gold,
            "extracted": letter,
            "rule": rule,
        }

    def _dims(self, records: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
        per_sample = []
        for j in range(metrics.num_samples(records)):
            rows = []
            for r in records:
                scores = r.get("scores") or []
                ok = bool(scores[j].get(key)) if j < len(scores) else False
                rows.append({**r["meta"], "correct": ok})
            per_sample.append(four_dimensional(rows))
        return _mean_dicts(per_sample)

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        official = self._dims(records, "correct")
        fallback = self._dims(records, "correct_with_fallback")
        return {
            **metrics.base_counts(records),
            **metrics.sample_metrics(records),
            **official,
            "with_fallback": {
                "label": "NON-OFFICIAL: rows the official rule cannot read are scored by the "
                "last \\boxed{} letter",
                "accuracy": metrics.avg_at_k(
                    metrics.correct_matrix(records, key="correct_with_fallback")
                ),
                **fallback,
            },
        }

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
