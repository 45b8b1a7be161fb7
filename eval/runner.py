"""Run benchmarks against a rollout engine, or re-score saved predictions.

Layout of an output directory::

    <out>/<benchmark>/predictions.jsonl   one record per item, appended as batches finish
    <out>/<benchmark>/run.json            benchmark, samples, sampling, run_info (resume guard)
    <out>/<benchmark>/summary.json        that benchmark's summary
    <out>/summary.json                    {benchmark: summary} for every benchmark in <out>
    <out>/summary.md                      the headline metrics as a markdown table

A record holds ``id``, ``prompt``, ``responses`` (one per sample), ``scores`` (one score dict per
sample), the first sample's ``response``/``extracted``/``rule``/``correct`` for reading, the
item's ``meta`` (categories) and ``error`` (a message when the item could not be run; it counts
as wrong). Rerunning into the same directory skips the ids already recorded, so an interrupted
run resumes. Each prompt carries ``meta["key"] = "<benchmark>:<id>"``, which the engines use to
seed each (prompt, sample) row, so completions do not depend on batch composition; with records
aggregated in dataset order, a resumed run's summary equals an uninterrupted one's. Summaries
contain metrics only, so ``score_predictions`` on the same predictions reproduces them exactly.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from opsd_mm.eval.benchmarks._common import without_image_decoding
from opsd_mm.eval.registry import Benchmark, get_benchmark
from opsd_mm.types import Processor, RolloutEngine, SamplingConfig

Decode = Callable[[Sequence[int]], str]
_AUTO_HEADLINE = re.compile(r"^(\w+_)?((avg|pass|maj)@\d+|\d+/\d+)$")


# ----------------------------------------------------------------------------- records


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


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Records already written to ``path`` by id. A torn last line (killed mid-write) is
    dropped and the file rewritten; a bad line elsewhere is an error naming the line."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    records: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                kept = [json.dumps(r, ensure_ascii=False) for r in records.values()]
                path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
                break
            raise ValueError(f"{path}:{n} is not valid JSON; fix or delete the file") from None
        records[str(rec["id"])] = rec
    return records


def _append(path: Path, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
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


# ----------------------------------------------------------------------------- generation


def resolve_sampling(
    bench: Benchmark,
    samples: int,
    sampling: SamplingConfig | Mapping[str, Any] | None,
    seed: int,
) -> SamplingConfig:
    """A full SamplingConfig: the given one, or the benchmark's defaults for ``samples``
    updated with the given overrides; the seed defaults to ``seed``."""
    if isinstance(sampling, SamplingConfig):
        return sampling if sampling.seed is not None else dataclasses.replace(sampling, seed=seed)
    fields = {**bench.default_sampling(samples), **dict(sampling or {})}
    fields.setdefault("seed", seed)
    return SamplingConfig(**fields)


def _check_run_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse to resume into a directory produced with different settings."""
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise ValueError(
                f"{path.parent} holds a run with different {', '.join(diff)} "
                f"({ {k: old.get(k) for k in diff} } vs { {k: config.get(k) for k in diff} }); "
                "use a new --output directory"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")


def _running_accuracy(records: Mapping[str, dict[str, Any]]) -> float:
    vals = [
        bool(s.get("correct"))
        for r in records.values()
        for s in (r.get("scores") or [{"correct": False}])
        if s.get("graded", True)
    ]
    return sum(vals) / len(vals) if vals else 0.0


def run_benchmark(
    bench: Benchmark,
    engine: RolloutEngine,
    processor: Processor,
    output_dir: Path,
    *,
    decode: Decode,
    limit: int | None = None,
    samples: int = 1,
    sampling: SamplingConfig | Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 8,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, score and summarise one benchmark, resuming from earlier records."""
    ds = bench.load(data_dir)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    raw = without_image_decoding(ds)
    ids = [bench.item_id(r) for r in raw.select_columns(list(bench.id_columns))]
    if len(set(ids)) != len(ids):
        raise ValueError(f"benchmark '{bench.name}' has duplicate item ids")
    cfg = resolve_sampling(bench, samples, sampling, seed)
    bench_dir = output_dir / bench.name
    _check_run_config(
        bench_dir / "run.json",
        {
            "benchmark": bench.name,
            "label": bench.label,
            "samples": samples,
            "sampling": dataclasses.asdict(cfg),
            "run_info": dict(run_info or {}),
        },
    )
    preds_path = bench_dir / "predictions.jsonl"
    done = read_records(preds_path)
    todo = [i for i, iid in enumerate(ids) if iid not in done]
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc=bench.name, disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        ready, finished = [], []
        for i in batch:
            try:
                example = bench.prompt(ds[i])
                prompt = processor.student_prompt(example)
                # Engines seed each (prompt key, sample) row: keyed by item, a completion does
                # not depend on which items share its batch, so resumed runs sample the same.
                prompt.meta.setdefault("key", f"{bench.name}:{example.id}")
                ready.append((i, prompt))
            except Exception as e:  # a broken row is recorded and the run goes on
                msg = f"{type(e).__name__}: {e}"
                finished.append(make_record(bench, raw[i], error=msg))
        if ready:
            rollouts_P_G = engine.generate([p for _, p in ready], n=samples, sampling=cfg)
            for (i, prompt), rollouts in zip(ready, rollouts_P_G):
                finished.append(
                    make_record(
                        bench,
                        raw[i],
                        prompt=prompt.text,
                        responses=[decode(r.completion_ids) for r in rollouts],
                        finish_reasons=[r.finish_reason for r in rollouts],
                    )
                )
        done.update((r["id"], r) for r in _append(preds_path, finished))
        bar.update(len(batch))
        bar.set_postfix(acc=f"{_running_accuracy(done):.3f}")
    bar.close()
    return write_summaries(output_dir, bench, [done[i] for i in ids])


def run_eval(
    benchmarks: Sequence[str | Benchmark],
    engine: RolloutEngine,
    processor: Processor,
    output_dir: str | Path,
    *,
    decode: Decode,
    limit: int | None = None,
    samples: int = 1,
    sampling: SamplingConfig | Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 8,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run each benchmark (a name or an instance) in turn; returns ``{name: summary}``.

    ``processor.student_prompt`` must render ``Example.question`` verbatim as the user message
    (the ``plain`` student template); ``decode`` turns completion ids into text.
    ``sampling`` is a full SamplingConfig, or overrides on each benchmark's defaults (greedy for
    one sample; the benchmark's recommended temperature for several).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for b in benchmarks:
        bench = get_benchmark(b) if isinstance(b, str) else b
        summaries[bench.name] = run_benchmark(
            bench,
            engine,
            processor,
            out,
            decode=decode,
            limit=limit,
            samples=samples,
            sampling=sampling,
            data_dir=data_dir,
            seed=seed,
            batch_size=batch_size,
            run_info=run_info,
            progress=progress,
        )
    return summaries


# ----------------------------------------------------------------------------- re-scoring


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Prediction lines: ``{"id", "response"}`` or ``{"id", "responses": [...]}`` (a record
    written by the runner qualifies; an errored record keeps its ``error``)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not valid JSON") from None
        if "id" not in obj:
            raise ValueError(f"{path}:{n} has no 'id'")
        if "responses" not in obj and "response" not in obj and not obj.get("error"):
            raise ValueError(f"{path}:{n} (id {obj['id']}) has neither 'response' nor 'responses'")
        out.append(obj)
    return out


def score_predictions(
    benchmark: str | Benchmark,
    predictions_path: str | Path,
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Re-score saved predictions; writes the same files as a run and returns the summary.

    Items are scored in dataset order; only ids present in the file are scored (so a
    ``--limit`` run is reproduced). ``output_dir`` defaults to ``<predictions dir>/rescored``.
    """
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    predictions_path = Path(predictions_path)
    out = Path(output_dir) if output_dir else predictions_path.parent / "rescored"
    preds = {str(p["id"]): p for p in read_predictions(predictions_path)}
    raw = without_image_decoding(bench.load(data_dir))
    ids = [bench.item_id(r) for r in raw.select_columns(list(bench.id_columns))]
    unknown = sorted(set(preds) - set(ids))
    if unknown:
        raise ValueError(
            f"{predictions_path}: {len(unknown)} ids not in benchmark '{bench.name}' "
            f"(e.g. {unknown[:5]}); check --benchmark and --data-dir"
        )
    records = []
    for i, iid in enumerate(ids):
        if iid not in preds:
            continue
        p = preds[iid]
        responses = p.get("responses")
        if responses is None:
            responses = [p["response"]] if p.get("response") is not None else []
        records.append(
            make_record(
                bench,
                raw[i],
                prompt=p.get("prompt", ""),
                responses=responses,
                finish_reasons=p.get("finish_reasons"),
                error=p.get("error") if not responses else None,
            )
        )
    bench_dir = out / bench.name
    bench_dir.mkdir(parents=True, exist_ok=True)
    preds_out = bench_dir / "predictions.jsonl"
    preds_out.unlink(missing_ok=True)
    return write_summaries(out, bench, _append(preds_out, records))
