"""Run benchmarks against a rollout engine, or re-score saved predictions.

Records and summaries go to an output directory laid out as ``records.py`` says. Rerunning into
the same directory skips the ids already recorded, so an interrupted run resumes. Each prompt
carries ``meta["key"] = "<benchmark>:<id>"``, which the engines use to seed each (prompt, sample)
row, so completions do not depend on batch composition; with records aggregated in dataset order,
a resumed run's summary equals an uninterrupted one's. Summaries contain metrics only, so
``score_predictions`` on the same predictions reproduces them exactly.

A benchmark with an LLM judge (``bench.judge``, eval/judge.py) names the requests each response
needs (``bench.judge_requests``); :func:`ask_judge` sends a batch's missing ones together before
the batch is scored, and the replies stored in earlier records are remembered first, so a
resumed run or a re-scoring never sends a request twice.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from opsd_mm.eval.benchmarks._common import EvalError, without_image_decoding
from opsd_mm.eval.judge import Judge
from opsd_mm.eval.records import (
    append_records,
    json_lines,
    make_record,
    read_records,
    record_id,
    rewrite_records,
    write_summaries,
)
from opsd_mm.eval.registry import Benchmark, get_benchmark
from opsd_mm.rollout.base import RolloutEngine
from opsd_mm.types import Processor, SamplingConfig

Decode = Callable[[Sequence[int]], str]
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
            raise EvalError(
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


def ask_judge(
    bench: Benchmark, items_responses: Sequence[tuple[Mapping[str, Any], Sequence[str]]]
) -> None:
    """Have ``bench``'s judge answer every request its responses need (a no-op without one)."""
    judge, requests_for = getattr(bench, "judge", None), getattr(bench, "judge_requests", None)
    if not isinstance(judge, Judge) or requests_for is None:
        return
    judge.ask([q for item, rs in items_responses for r in rs for q in requests_for(dict(item), r)])


def remember_judged(bench: Benchmark, records: Iterable[Mapping[str, Any]]) -> None:
    """Seed ``bench``'s judge with the replies stored in ``records``."""
    judge = getattr(bench, "judge", None)
    if isinstance(judge, Judge):
        judge.remember(records)


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
    rows: datasets.Dataset | None = None,
) -> dict[str, Any]:
    """Generate, score and summarise one benchmark, resuming from earlier records (their stored
    responses are scored again with the current scorer). ``rows``: the benchmark's rows when
    already loaded (:func:`load_benchmarks`)."""
    check_run_args(limit=limit, samples=samples, batch_size=batch_size)
    ds = bench.load(data_dir) if rows is None else rows
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    raw = without_image_decoding(ds)
    ids = [bench.item_id(r) for r in raw.select_columns(list(bench.id_columns))]
    if len(set(ids)) != len(ids):
        raise EvalError(f"benchmark '{bench.name}' has duplicate item ids")
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
    earlier = read_records(preds_path)
    remember_judged(bench, earlier.values())
    done = rescore_records(bench, raw, ids, earlier, preds_path)
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
            responses_P_G = [[decode(r.completion_ids) for r in rs] for rs in rollouts_P_G]
            ask_judge(bench, [(raw[i], rs) for (i, _), rs in zip(ready, responses_P_G)])
            for (i, prompt), rollouts, responses in zip(ready, rollouts_P_G, responses_P_G):
                finished.append(
                    make_record(
                        bench,
                        raw[i],
                        prompt=prompt.text,
                        responses=responses,
                        finish_reasons=[r.finish_reason for r in rollouts],
                    )
                )
        done.update((r["id"], r) for r in append_records(preds_path, finished))
        bar.update(len(batch))
        bar.set_postfix(acc=f"{_running_accuracy(done):.3f}")
    bar.close()
    return write_summaries(output_dir, bench, [done[i] for i in ids])


def rescore_records(
    bench: Benchmark,
    raw: datasets.Dataset,
    ids: Sequence[str],
    done: dict[str, dict[str, Any]],
    path: Path,
) -> dict[str, dict[str, Any]]:
    """Records of a resumed run with their stored responses scored by the current scorer (a
    fixed or changed scorer must not leave stale ``correct`` values in the summary); the file
    is rewritten when a score changed. Errored records (no responses) are kept as they are."""
    changed = False
    scored = [
        (i, done[iid])
        for i, iid in enumerate(ids)
        if iid in done and not done[iid].get("error") and done[iid].get("responses")
    ]
    ask_judge(bench, [(raw[i], old["responses"]) for i, old in scored])
    for i, old in scored:
        iid = ids[i]
        new = make_record(
            bench,
            raw[i],
            prompt=old.get("prompt", ""),
            responses=old["responses"],
            finish_reasons=old.get("finish_reasons"),
        )
        new = json.loads(json.dumps(new, ensure_ascii=False))
        if new != old:
            done[iid], changed = new, True
    if changed:
        rewrite_records(path, list(done.values()))
    return done


def check_run_args(*, limit: int | None, samples: int, batch_size: int) -> None:
    """``--limit`` (None: all items), ``--samples`` and ``--batch-size`` must be >= 1."""
    for flag, value in (("--limit", limit), ("--samples", samples), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} {value}: must be >= 1")


def load_benchmarks(
    benchmarks: Sequence[Benchmark], data_dir: str | Path | None
) -> dict[str, datasets.Dataset]:
    """Every benchmark's rows, loaded before anything generates, so that a missing local copy
    (or split) is reported up front; all such problems at once, each naming the benchmark and
    the directory looked in."""
    loaded, problems = {}, []
    for bench in benchmarks:
        try:
            loaded[bench.name] = bench.load(data_dir)
        except EvalError as e:
            problems.append(str(e))
    if problems:
        raise EvalError("\n".join(problems))
    return loaded


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
    rows: Mapping[str, datasets.Dataset] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run each benchmark (a name or an instance) in turn; returns ``{name: summary}``.

    Every benchmark is loaded first (or taken from ``rows``, by name, as
    :func:`load_benchmarks` returns them), so a missing copy fails before any generation.

    ``processor.student_prompt`` must render ``Example.question`` verbatim as the user message
    (the ``plain`` student template); ``decode`` turns completion ids into text.
    ``sampling`` is a full SamplingConfig, or overrides on each benchmark's defaults (greedy for
    one sample; the benchmark's recommended temperature for several).
    """
    check_run_args(limit=limit, samples=samples, batch_size=batch_size)
    benches = [get_benchmark(b) if isinstance(b, str) else b for b in benchmarks]
    loaded = dict(rows) if rows is not None else load_benchmarks(benches, data_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for bench in benches:
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
            rows=loaded[bench.name],
        )
    return summaries


# ----------------------------------------------------------------------------- re-scoring


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Prediction lines: ``{"id", "response"}`` or ``{"id", "responses": [...]}`` (a record
    written by the runner qualifies; an errored record keeps its ``error``)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--predictions: no such file: {path}")
    out = []
    for n, _, obj in json_lines(path):
        if isinstance(obj, EvalError):
            raise obj
        iid = record_id(path, n, obj)
        if "responses" not in obj and "response" not in obj and not obj.get("error"):
            raise EvalError(f"{path}, line {n} (id {iid}): has neither 'response' nor 'responses'")
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
        raise EvalError(
            f"{predictions_path}: {len(unknown)} ids not in benchmark '{bench.name}' "
            f"(e.g. {unknown[:5]}); check --benchmark and --data-dir"
        )
    remember_judged(bench, preds.values())
    todo = []
    for i, iid in enumerate(ids):
        if iid not in preds:
            continue
        p = preds[iid]
        responses = p.get("responses")
        if responses is None:
            responses = [p["response"]] if p.get("response") is not None else []
        todo.append((i, p, responses))
    ask_judge(bench, [(raw[i], responses) for i, _, responses in todo])
    records = []
    for i, p, responses in todo:
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
    return write_summaries(out, bench, append_records(preds_out, records))
