"""The output directory of an evaluation: prediction records and summaries.

Layout::

    <out>/<benchmark>/predictions.jsonl   one record per item, appended as batches finish
    <out>/<benchmark>/run.json            benchmark, samples, sampling, run_info (resume guard)
    <out>/<benchmark>/summary.json        that benchmark's summary
    <out>/summary.json                    {benchmark: summary} for every benchmark in <out>
    <out>/summary.md                      the headline metrics as a markdown table

A record holds ``id``, ``prompt``, ``responses`` (one per sample), ``scores`` (one score dict per
sample), the first sample's ``response``/``extracted``/``rule``/``correct`` for reading, the
item's ``meta`` (categories) and ``error`` (a message when the item could not be run; it counts
as wrong). A sample scored with an LLM judge keeps the replies it used in its score
(``"judge": [{"model", "prompt_sha256", "sample", "reply"}]``, eval/judge.py), so that a resumed
run and a re-scoring read them instead of asking again.

Records are JSON Lines appended as batches finish; a torn last line (a run killed mid-write) is
dropped on resume, a bad line elsewhere is an error naming the file and line. Summaries hold
metrics only (no paths, times or model names), so re-scoring the same predictions reproduces
them exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from opsd_mm.eval.benchmarks._common import EvalError
from opsd_mm.eval.registry import Benchmark

_AUTO_HEADLINE = re.compile(r"^(\w+_)?((avg|pass|maj)@\d+|\d+/\d+)$")


def make_record(
    bench: Benchmark,
    item: Mapping[str, Any],
    *,
    prompt: str = "",
    responses: Sequence[str] = (),
    finish_reasons: Sequence[str] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """Score ``responses`` for ``item`` (undecoded row) into a record."""
    scores = [] if error else [bench.score(dict(item), r) for r in responses]
    first = scores[0] if scores else {}
    return {
        "id": bench.item_id(dict(item)),
        "prompt": prompt,
        "responses": list(responses),
        "finish_reasons": list(finish_reasons) if finish_reasons is not None else None,
        "scores": scores,
        "response": responses[0] if responses else None,
        "extracted": first.get("extracted"),
        "rule": first.get("rule"),
        "correct": bool(first.get("correct", False)),
        "meta": bench.categories(dict(item)),
        "error": error,
    }


def json_lines(path: Path) -> Iterator[tuple[int, bool, Any]]:
    """``(line number, is last line, parsed object)`` for each non-blank line of a JSON Lines
    file; for a line that is not UTF-8 or not JSON, an EvalError naming the file and line takes
    the object's place (the caller decides: a torn last line is dropped on resume)."""
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            yield n, n == len(lines), json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield n, n == len(lines), EvalError(f"{path}, line {n}: not UTF-8 text ({e.reason})")
        except json.JSONDecodeError as e:
            yield n, n == len(lines), EvalError(f"{path}, line {n}: not valid JSON ({e.msg})")


def record_id(path: Path, n: int, obj: Any) -> str:
    if not isinstance(obj, dict) or "id" not in obj:
        raise EvalError(f"{path}, line {n}: a record needs an 'id' field; fix or delete the line")
    return str(obj["id"])


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records already written to ``path`` by id. A torn last line (killed mid-write, possibly
    inside a multi-byte character) is dropped and the file rewritten; a bad line elsewhere is an
    error naming the file and line."""
    if not path.exists():
        return {}
    records: dict[str, dict[str, Any]] = {}
    for n, last, rec in json_lines(path):
        if isinstance(rec, EvalError):
            if last:
                rewrite_records(path, list(records.values()))
                break
            raise EvalError(f"{rec}; fix or delete the file") from None
        records[record_id(path, n, rec)] = rec
    return records


def rewrite_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` (written beside it, then renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    tmp.replace(path)


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append ``records`` and return them as read back, so that in-memory records equal the
    ones a resumed run loads (JSON turns tuples into lists)."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
    return [json.loads(line) for line in lines]


# ----------------------------------------------------------------------------- summaries


def summarize(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's summary: metrics only (no paths, times or model names)."""
    metrics = bench.aggregate(records)
    keys = [k for k in bench.headline if k in metrics]
    keys += [k for k in metrics if _AUTO_HEADLINE.match(k) and k not in keys]
    if any(k.startswith("avg@") for k in keys):  # with k samples, accuracy is avg@k
        keys = [k for k in keys if k != "accuracy"]
    return {
        "benchmark": bench.name,
        "hub_id": bench.hub_id,
        "split": bench.split,
        "label": bench.label,
        "headline": {k: metrics[k] for k in keys},
        "metrics": metrics,
    }


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per headline metric: value in percent, items, errors, timeouts, scoring label."""
    lines = [
        "| benchmark | metric | value (%) | n | errors | timeouts | scoring |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        m = s["metrics"]
        for i, (key, value) in enumerate(s["headline"].items()):
            shown = f"{100 * value:.2f}" if isinstance(value, int | float) else str(value)
            lines.append(
                f"| {name} | {key} | {shown} | {m.get('n', '')} | {m.get('n_errors', '')} "
                f"| {m.get('n_timeouts', '')} | {s['label'] if i == 0 else ''} |"
            )
    return "\n".join(lines) + "\n"


def write_summaries(
    output_dir: Path, bench: Benchmark, records: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Write the benchmark's summary and refresh the directory-wide summary and table."""
    summary = summarize(bench, records)
    bench_dir = output_dir / bench.name
    bench_dir.mkdir(parents=True, exist_ok=True)
    (bench_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    top_path = output_dir / "summary.json"
    top = json.loads(top_path.read_text()) if top_path.exists() else {}
    top[bench.name] = summary
    top_path.write_text(json.dumps(top, indent=2) + "\n")
    (output_dir / "summary.md").write_text(markdown_table(top))
    return summary
