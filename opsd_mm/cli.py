"""Command line: ``opsd-mm train | eval | demo | data | plot | export | serve``.

This is the one module that wires processors and evaluation into the modality-agnostic core.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from opsd_mm.config import RunConfig, load_config
from opsd_mm.errors import DEBUG_ENV, debug_requested, run_command


def processor_path(cfg: RunConfig) -> str:
    from opsd_mm.model.load import resolve_model_path

    return resolve_model_path(cfg.model)


def data_wiring() -> Any:
    """Processors and benchmark loaders for the data commands and the trainer's data set-up."""
    from opsd_mm.data.cli import DataWiring

    def build(cfg: RunConfig) -> Any:
        from opsd_mm.model.load import check_model_family, model_type_of
        from opsd_mm.processors import build_processor

        path = processor_path(cfg)
        model_type = model_type_of(path, cfg.model.revision, cfg.model.trust_remote_code)
        check_model_family(cfg, model_type)  # before the processor (and the model) loads
        return build_processor(cfg.processor, path, model_type)

    def template_fields(name: str) -> frozenset[str]:
        from opsd_mm.processors.templates import get_template

        return get_template(name, "teacher").fields

    def load_references(names: Any, data_dir: str | None) -> Any:
        from opsd_mm.eval.references import load_references as load

        return load(names, data_dir)

    def benchmark_names() -> list[str]:
        from opsd_mm.eval.registry import list_benchmarks

        return list_benchmarks()

    def teacher_prompts(cfg: RunConfig, processor: Any) -> Any:
        """With a model teacher or a teachers mapping, each example's teacher context as its
        own teacher renders it (a model teacher's vocabulary checked, its processor built; no
        weights loaded); None for the student's own weights alone."""
        from opsd_mm.config import teacher_specs

        specs = teacher_specs(cfg)
        if not cfg.teachers and all(s.kind == "self" for s in specs.values()):
            return None
        from opsd_mm.processors import build_processor
        from opsd_mm.teacher.routing import route
        from opsd_mm.train.build import check_teachers

        own = {
            c.name: c.processor for c in check_teachers(cfg, processor_path(cfg), build_processor)
        }

        def render(ex: Any) -> Any:
            name = route(cfg, ex)
            prompt = own.get(name, processor).teacher_prompt(ex)
            prompt.meta["teacher"] = name
            return prompt

        return render

    return DataWiring(build, template_fields, load_references, benchmark_names, teacher_prompts)


def cmd_data(command: str, args: argparse.Namespace) -> int:
    from opsd_mm.data.cli import cmd_check, cmd_inspect

    return (cmd_inspect if command == "inspect" else cmd_check)(args, data_wiring())


def build_trainer(cfg: RunConfig, accelerator: Any = None) -> Any:
    """Everything a run needs, from the config alone (``opsd_mm.train.build.trainer_from_config``,
    with the processors and benchmark loaders wired in here)."""
    from opsd_mm.processors import build_processor
    from opsd_mm.train.build import trainer_from_config

    return trainer_from_config(
        cfg,
        data_wiring(),
        accelerator,
        reward=build_reward(cfg),
        build_processor=build_processor,  # a model teacher's own processor
    )


def build_reward(cfg: RunConfig) -> Any:
    """``loss.reward`` from evaluation's grading (``opsd_mm.eval.rewards``) when
    ``loss.reward_weight`` > 0, else None (pure OPSD computes no reward)."""
    if cfg.loss.reward_weight <= 0:
        return None
    from opsd_mm.eval.rewards import build_reward as build

    return build(cfg.loss.reward, cfg.loss.reward_timeout)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("trainer.resume=true")
    if args.overwrite:
        overrides.append("trainer.overwrite=true")
    cfg = load_config(args.config, overrides)
    from opsd_mm.train.run_dir import check_fresh, check_writable

    # Before any data or model loads (the trainer checks again when it claims run_dir).
    check_writable(cfg.run_dir)
    if not (cfg.trainer.resume or cfg.trainer.overwrite):
        check_fresh(cfg.run_dir)
    trainer = build_trainer(cfg)
    from opsd_mm.train.signals import TrainingInterrupted

    try:
        history = trainer.train()
    except TrainingInterrupted as stop:
        if trainer.accelerator.is_main_process:
            print(f"interrupted: {stop} (run dir {cfg.run_dir})", file=sys.stderr)
        return stop.exit_code
    if history and trainer.accelerator.is_main_process:
        last = history[-1]
        loss = "skipped" if last["loss"] is None else f"{last['loss']:.6g}"
        print(
            f"done: step {last['step']} loss {loss} "
            f"(run dir {cfg.run_dir}; metrics in metrics.jsonl)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from opsd_mm.demo import Wiring, run_demo
    from opsd_mm.eval.examples import evaluate_examples
    from opsd_mm.processors import build_processor

    return run_demo(
        args,
        Wiring(
            build_processor=build_processor, evaluate=evaluate_examples, build_reward=build_reward
        ),
    )


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from opsd_mm.train.plot import plot_runs

    output = args.output or Path(args.run_dirs[0]) / "metrics.png"
    print(f"wrote {plot_runs(args.run_dirs, output)}")
    return 0


def add_plot_parser(sub: Any) -> None:
    plot = sub.add_parser(
        "plot",
        help="draw runs' metrics.jsonl curves into one PNG",
        description="Loss, divergence (mean, p99), student/teacher entropy, completion length, "
        "clip fraction and eval accuracy (when logged) over steps; several runs are overlaid.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    plot.add_argument("--output", "-o", help="PNG path (default: FIRST_RUN_DIR/metrics.png)")
    plot.set_defaults(func=cmd_plot)


def cmd_export(args: argparse.Namespace) -> int:
    from opsd_mm.model.export import export_checkpoint

    print(f"exported {args.checkpoint} to {export_checkpoint(args.checkpoint, args.out)}")
    return 0


def add_export_parser(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="write a checkpoint as a full model (LoRA merged) with its tokenizer/processor",
        description="Write RUN_DIR/checkpoints/step-N as one directory that transformers "
        "from_pretrained and vLLM load: a LoRA adapter merged into the base model named by "
        "RUN_DIR/config.yaml, or the fully fine-tuned weights; plus the tokenizer/processor.",
    )
    export.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N")
    export.add_argument("--out", required=True, help="output directory (new or empty)")
    export.set_defaults(func=cmd_export)


def cmd_config_reference(args: argparse.Namespace) -> int:
    from opsd_mm.config import reference_markdown

    text = reference_markdown()
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from opsd_mm.config import show_config
    from opsd_mm.data.presets import resolve_data

    sys.stdout.write(show_config(args.config, list(args.overrides), resolve=resolve_data))
    return 0


def add_config_parser(sub: Any) -> None:
    config = sub.add_parser(
        "config",
        help="the config reference, and a config as training resolves it",
        description="Every config key (type, default, meaning), or a recipe's resolved values "
        "with their origin.",
    )
    commands = config.add_subparsers(dest="config_command", required=True)
    reference = commands.add_parser(
        "reference",
        help="print the config reference (Markdown; docs/config.md)",
        description="Every config key with its type, default and meaning, as Markdown, "
        "generated from the documentation of the config dataclasses.",
    )
    reference.add_argument("--output", "-o", help="write it to this file instead of stdout")
    reference.set_defaults(func=cmd_config_reference)
    show = commands.add_parser(
        "show",
        help="print a config as training would use it, each value with its origin",
        description="The resolved config (defaults, the YAML file, the overrides, then "
        "resolution), one 'key: value  # origin' line per key; origin is default, file, "
        "override or resolved. Secrets are masked.",
    )
    show.add_argument("config", help="YAML config (see configs/)")
    show.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    show.set_defaults(func=cmd_config_show)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "datasets", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(
        prog="opsd-mm",
        description="On-Policy Self-Distillation for text and vision-language models",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train with OPSD from a YAML config",
        description="Train with OPSD. Overrides are dotted key=value pairs, e.g. "
        "run_dir=runs/x trainer.max_steps=3 loss.beta=0.5",
    )
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in run_dir"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run_dir that holds another run: the old one is renamed to "
        "RUN_DIR.replaced-TIME first (nothing is deleted)",
    )
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser(
        "demo",
        help="offline demo: OPSD teaches a tiny model (text and vision)",
        description="Generate synthetic tasks, warm-start tiny models, train with OPSD and SFT, "
        "evaluate before/after, print a table and write a plot.",
    )
    from opsd_mm.demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    from opsd_mm.data.cli import add_data_parser

    add_data_parser(sub, cmd_data)
    add_plot_parser(sub)
    add_export_parser(sub)
    add_config_parser(sub)
    from opsd_mm.rollout.server import add_serve_parser

    add_serve_parser(sub)

    try:
        from opsd_mm.eval.cli import add_eval_parser
    except ImportError:  # evaluation package incomplete
        add_eval_parser = None
    if add_eval_parser is not None:
        add_eval_parser(sub)

    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of errors (anywhere on the command line; or {DEBUG_ENV}=1). "
        "Without it, a problem with a config key, a file, a row or a flag is one message and "
        "exit code 2; Ctrl-C exits 130",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    args = parser.parse_args([a for a in argv if a != "--debug"])
    return run_command(args.func, args, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
