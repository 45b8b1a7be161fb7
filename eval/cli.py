"""``opsd-mm eval`` (generate and score) and ``opsd-mm eval score`` (re-score predictions).

The core CLI wires these in with ``add_eval_parser(subparsers)``; the parser's ``func`` default
is :func:`main_eval`. Loading a model is delegated to a runtime factory so the runner stays
independent of model code: the default one uses ``opsd_mm.model.load.load_for_inference``, the
processors (``plain`` student template) and the rollout engines; tests pass their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_mm.eval.benchmarks._common import EvalError
from opsd_mm.eval.judge import DEFAULT_CONCURRENCY, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S
from opsd_mm.eval.registry import DEFAULT_SUITE, TEXT_MATH, get_benchmark, list_benchmarks
from opsd_mm.rollout.base import RolloutEngine
from opsd_mm.types import Processor

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens")
# The benchmarks whose official score needs an LLM judge (--judge-url, --judge-model).
JUDGED = ("mathvista", "amo_bench")


@dataclass
class Runtime:
    """What the runner needs from a loaded model."""

    engine: RolloutEngine
    processor: Processor
    decode: Callable[[Any], str]


RuntimeFactory = Callable[[argparse.Namespace], Runtime]


def default_runtime(args: argparse.Namespace) -> Runtime:
    """Load ``--model`` (a directory, hub id or ``tiny:<name>``; ``--adapter`` merged in) with a
    processor whose student template is ``plain``, so each benchmark's user message goes to the
    chat template verbatim, and the engine named by ``--engine``."""
    import torch

    from opsd_mm.config import ModelConfig, ProcessorConfig, RolloutConfig
    from opsd_mm.model.load import load_for_inference, model_type_of, resolve_model_path
    from opsd_mm.processors import build_processor

    path = resolve_model_path(ModelConfig(name_or_path=args.model), key="--model")
    proc_cfg = ProcessorConfig(
        student_template="plain",
        student_thinking=args.thinking,
        max_prompt_tokens=args.max_prompt_tokens,
        bad_image_policy="raise",
    )
    processor = build_processor(proc_cfg, path, model_type_of(path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = processor.tokenizer
    decode = lambda ids: tok.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    if args.engine == "vllm":
        from opsd_mm.rollout.vllm_engine import VLLMEngine

        max_new = args.max_new_tokens or RolloutConfig().max_new_tokens
        engine = VLLMEngine(
            path,
            RolloutConfig(engine="vllm"),
            dtype="bfloat16" if args.dtype == "auto" and device == "cuda" else args.dtype,
            seed=args.seed,
            max_model_len=args.max_prompt_tokens + max_new,
            suppress_token_ids=processor.suppress_token_ids,
            eos_token_ids=processor.eos_token_ids,
        )
        if args.adapter:  # vLLM loads the base weights; hand it the merged model
            engine.sync_weights(load_for_inference(path, args.adapter, device, args.dtype))
        return Runtime(engine, processor, decode)
    from opsd_mm.rollout.hf import HFEngine

    model = load_for_inference(path, args.adapter, device, args.dtype)
    engine = HFEngine.for_processor(model, processor)
    return Runtime(engine, processor, decode)


def _benchmark_names(spec: str) -> list[str]:
    names = list(DEFAULT_SUITE) if spec == "all" else [s.strip() for s in spec.split(",") if s]
    unknown = [n for n in names if n not in list_benchmarks()]
    if unknown:
        raise EvalError(
            f"--benchmarks: unknown benchmark(s) {unknown}; choose from {list_benchmarks()}"
        )
    return names


def _make_benchmark(name: str, prompt_style: str, judge: Any = None) -> Any:
    if name in TEXT_MATH:
        return get_benchmark(name, prompt_style=prompt_style)
    if name in JUDGED and judge is not None:
        return get_benchmark(name, judge=judge)
    return get_benchmark(name)


def _judge_from_args(args: argparse.Namespace, predictions: str | None = None) -> Any:
    """The Judge the --judge-* flags describe, or None. For ``eval score`` without
    --judge-model, the one judge whose replies the predictions hold (offline), if any."""
    from opsd_mm.eval.judge import Judge, stored_judge_models

    url, model = getattr(args, "judge_url", None), getattr(args, "judge_model", None)
    if url and not model:
        raise EvalError("--judge-url needs --judge-model (the model name the endpoint serves)")
    if getattr(args, "judge_key_env", None) and not url:
        raise EvalError("--judge-key-env is the key for --judge-url; give the URL too")
    if model is None and predictions is not None:
        from opsd_mm.eval.runner import read_predictions

        models = stored_judge_models(read_predictions(predictions))
        if len(models) > 1:
            raise EvalError(
                f"{predictions} holds replies of several judges {models}; pick one with "
                "--judge-model"
            )
        model = models[0] if models else None
    if model is None:
        return None
    flags = {
        "key_env": getattr(args, "judge_key_env", None),
        "concurrency": getattr(args, "judge_concurrency", None),
        "timeout": getattr(args, "judge_timeout", None),
        "retries": getattr(args, "judge_retries", None),
        "max_tokens": getattr(args, "judge_max_tokens", None),
    }
    return Judge(model, url, **{k: v for k, v in flags.items() if v is not None})


def _add_judge_flags(p: argparse.ArgumentParser, default: Any = None) -> None:
    p.add_argument(
        "--judge-url",
        default=default,
        help="OpenAI-compatible endpoint (e.g. https://api.openai.com/v1, or vLLM's "
        "http://127.0.0.1:8000/v1) for the official LLM steps of mathvista (answer extraction) "
        "and amo_bench (description answers)",
    )
    p.add_argument("--judge-model", default=default, help="the judge model's name at that endpoint")
    p.add_argument(
        "--judge-key-env",
        default=default,
        help="environment variable holding the endpoint's API key (e.g. OPENAI_API_KEY)",
    )
    p.add_argument(
        "--judge-concurrency",
        type=int,
        default=default,
        help=f"requests in flight (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument(
        "--judge-timeout",
        type=float,
        default=default,
        help=f"seconds per request (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--judge-retries",
        type=int,
        default=default,
        help="retries, with exponential backoff, of a request that failed to connect or got "
        f"HTTP 408/409/429/5xx (default {DEFAULT_RETRIES})",
    )
    p.add_argument(
        "--judge-max-tokens",
        type=int,
        default=default,
        help="cap on the judge's reply length (default: the official budgets, mathvista 1024, "
        "amo_bench 8192; a judge with a shorter context needs less)",
    )


def _judge_report(benches: list[Any]) -> str:
    from opsd_mm.eval.judge import Judge

    judges = {id(b.judge): b.judge for b in benches if isinstance(getattr(b, "judge", None), Judge)}
    return "".join(
        f"judge {j.model}: {j.sent} requests sent, {j.reused} answered from stored replies\n"
        for j in judges.values()
    )


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` (with its ``score`` sub-command) to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on scripted benchmarks",
        description="Generate with a model and score benchmarks by their official rules. "
        "Use 'opsd-mm eval score ...' to re-score saved predictions.",
    )
    p.add_argument(
        "--model", help="model directory, hub id or tiny:<name> (required unless 'score')"
    )
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument(
        "--benchmarks",
        default="all",
        help=f"comma-separated names or 'all' ({', '.join(DEFAULT_SUITE)}); also "
        "mathvision_mini, zerobench_sub",
    )
    p.add_argument("--data-dir", help="local copies: DIR/<benchmark> from datasets save_to_disk")
    p.add_argument("--limit", type=int, help="first N items of each benchmark")
    p.add_argument("--samples", type=int, default=1, help="samples per item (k)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--output", help="output directory (default runs/eval/<model name>)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompt-style",
        choices=("opsd", "matharena"),
        default="opsd",
        help="text-math prompt: OPSD's boxed instruction or MathArena's",
    )
    p.add_argument(
        "--temperature",
        type=float,
        help="default: 0 for one sample, else the benchmark's recommended value",
    )
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="generation budget (default 256, SamplingConfig's; reasoning models need far more)",
    )
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    p.add_argument(
        "--thinking", action="store_true", help="render the chat template with thinking enabled"
    )
    p.add_argument("--max-prompt-tokens", type=int, default=16384)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_judge_flags(p)
    sub = p.add_subparsers(dest="eval_command", metavar="{score}")
    s = sub.add_parser(
        "score",
        help="re-score saved predictions",
        description="Re-score a predictions file (one JSON object per line with 'id' and "
        "'response', or 'responses' for several samples) and write the same outputs as a run.",
    )
    s.add_argument("--benchmark", required=True, choices=list_benchmarks())
    s.add_argument("--predictions", required=True, help="predictions .jsonl file")
    # SUPPRESS keeps these from overwriting values given before 'score'.
    s.add_argument("--data-dir", default=argparse.SUPPRESS, help="local benchmark copies")
    s.add_argument(
        "--output",
        default=argparse.SUPPRESS,
        help="output dir (default <predictions dir>/rescored)",
    )
    s.add_argument(
        "--prompt-style",
        choices=("opsd", "matharena"),
        default=argparse.SUPPRESS,
        help="text math: the style the predictions were generated with (matharena also reads "
        "\\fbox{})",
    )
    # Without --judge-model, the replies stored in the predictions are used (offline).
    _add_judge_flags(s, default=argparse.SUPPRESS)
    p.set_defaults(func=main_eval)
    return p


def main_eval(args: argparse.Namespace, runtime_factory: RuntimeFactory | None = None) -> int:
    """Run ``opsd-mm eval`` or ``opsd-mm eval score`` from parsed arguments; returns 0."""
    from opsd_mm.eval.records import markdown_table
    from opsd_mm.eval.runner import check_run_args, load_benchmarks, run_eval, score_predictions

    if getattr(args, "eval_command", None) == "score":
        judge = _judge_from_args(args, args.predictions) if args.benchmark in JUDGED else None
        bench = _make_benchmark(args.benchmark, args.prompt_style, judge)
        summary = score_predictions(bench, args.predictions, args.data_dir, args.output)
        sys.stdout.write(markdown_table({bench.name: summary}))
        sys.stdout.write(_judge_report([bench]))
        return 0
    if not args.model:
        raise EvalError("--model is required (or use 'opsd-mm eval score')")
    # Everything that can be checked without the model fails before the model loads.
    names = _benchmark_names(args.benchmarks)
    check_run_args(limit=args.limit, samples=args.samples, batch_size=args.batch_size)
    if args.judge_model and not args.judge_url:
        raise EvalError(
            "--judge-model needs --judge-url for a run ('opsd-mm eval score' reads the stored "
            "replies without one)"
        )
    judge = _judge_from_args(args)
    benches = [_make_benchmark(n, args.prompt_style, judge) for n in names]
    rows = load_benchmarks(benches, args.data_dir)
    runtime = (runtime_factory or default_runtime)(args)
    overrides = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    output = args.output or str(Path("runs") / "eval" / Path(args.model.rstrip("/")).name)
    summaries = run_eval(
        benches,
        runtime.engine,
        runtime.processor,
        output,
        decode=runtime.decode,
        limit=args.limit,
        samples=args.samples,
        sampling=overrides,
        data_dir=args.data_dir,
        seed=args.seed,
        batch_size=args.batch_size,
        run_info={"model": args.model, "adapter": args.adapter, "engine": args.engine},
        progress=not args.no_progress,
        rows=rows,
    )
    sys.stdout.write(markdown_table(summaries))
    sys.stdout.write(_judge_report(benches))
    sys.stdout.write(f"outputs in {output}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m opsd_mm.eval.cli eval ...``) until the core CLI wires
    it in."""
    from opsd_mm.errors import debug_requested, run_command

    parser = argparse.ArgumentParser(prog="opsd-mm")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args([a for a in argv if a != "--debug"])
    return run_command(args.func, args, debug=debug_requested(argv))


if __name__ == "__main__":
    raise SystemExit(main())
