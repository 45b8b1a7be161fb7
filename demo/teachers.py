"""``opsd-mm demo --compare-teachers``: distillation from a bigger teacher beside OPSD.

The question is what the teacher needs: a stronger model, or the privileged context. Per task a
second warm start trains the 4-layer tiny teacher (``tiny:<model>-teacher``, the student's
tokenizer; ``opsd_mm.model.tiny.teacher``) with the student's warm-start recipe and
:data:`TEACHER_WARM_FACTOR` times its mixture steps (with the student's 300 the 4-layer teacher
reached 46.7% on the text task's test in the privileged context, below the 2-layer student's own
68.7%: not a stronger teacher; with 600, 80.0%), and every seed then distils the 2-layer
student three ways, in the same ``Trainer`` with the same LoRA,
learning rate, schedule, steps and rollouts (the task's OPSD recipe); only the teacher differs:

- ``opsd``: self-distillation, the student's own warm start in the privileged context;
- ``distill``: the bigger teacher in the student's context (``teacher.kind=model
  processor.teacher_template=same_as_student``): plain on-policy distillation, GKD-style;
- ``distill_priv``: the bigger teacher in the privileged context (``teacher.kind=model``).

The measure is accuracy per rollout token (validation accuracy against cumulative rollout
tokens, and the held-out test accuracy after the last step), as in ``--compare-rewards``. The
teacher's own accuracies in both contexts are reported beside (what each run could learn).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from opsd_mm.config import ModelConfig, ProcessorConfig

METHODS = ("opsd", "distill", "distill_priv")
COLOURS = {"opsd": "tab:blue", "distill": "tab:gray", "distill_priv": "tab:purple"}
LABELS = {
    "opsd": "OPSD (own weights, privileged)",
    "distill": "bigger teacher, student context",
    "distill_priv": "bigger teacher, privileged context",
}
TEACHER_RUNS = {"distill": ("processor.teacher_template=same_as_student",), "distill_priv": ()}
TEACHER_DIR = "teacher_warm_start"
TEACHER_WARM_FACTOR = 2  # the teacher's mixture steps, in units of the student's


def processor_overrides(pcfg: ProcessorConfig) -> tuple[str, ...]:
    """The demo processor's settings as config overrides, so that the run's config (from which
    the model teacher's own processor is built) renders as the demo's processor does."""
    default = ProcessorConfig()
    out = []
    for f in dataclasses.fields(pcfg):
        value = getattr(pcfg, f.name)
        if value != getattr(default, f.name):
            out.append(f"processor.{f.name}={'null' if value is None else value}")
    return tuple(out)


def teacher_overrides(task_dir: Path, pcfg: ProcessorConfig, method: str) -> tuple[str, ...]:
    """The config overrides of a teacher run (``distill`` or ``distill_priv``) after the
    recipe's: the warm-started bigger teacher, the demo processor's settings, and for
    ``distill`` the student's context."""
    return (
        "teacher.kind=model",
        f"teacher.model.name_or_path={task_dir / TEACHER_DIR}",
        "teacher.model.dtype=float32",
        *processor_overrides(pcfg),
        *TEACHER_RUNS[method],
    )


def warm_start_teacher(setup: Any, args: Any, progress: Any, tick_cost: float) -> dict:
    """The bigger teacher's warm start (the student's recipe on ``tiny:<model>-teacher``, with
    :data:`TEACHER_WARM_FACTOR` times the mixture steps) into TASK_DIR/teacher_warm_start, and
    its test accuracy in the student and teacher contexts."""
    from opsd_mm.demo.run import warm_start
    from opsd_mm.model.load import load_model
    from opsd_mm.model.tiny import resolve_tiny

    name, task, recipe = setup.name, setup.task, setup.plan.recipe
    recipe = dataclasses.replace(recipe, warm_steps=recipe.warm_steps * TEACHER_WARM_FACTOR)
    base = str(resolve_tiny(f"{recipe.tiny}-teacher", args.tiny_cache))
    out = setup.task_dir / TEACHER_DIR
    progress.write(f"[{name}] teacher warm start: SFT of tiny:{recipe.tiny}-teacher ...")
    warm = warm_start(
        task,
        recipe,
        base,
        setup.processor,
        out,
        seed=args.task_seed,
        tick=lambda _record: progress.add(tick_cost),
    )
    t0 = time.perf_counter()
    model = load_model(str(out), ModelConfig(dtype="float32")).eval()
    ev, new = setup.task_dir / "eval_teacher_warm_start", task.max_new_tokens
    evaluate = setup.wiring.evaluate
    student_ctx = evaluate(model, setup.processor, task.test, ev, "test_student", new)
    teacher_ctx = evaluate(
        model, setup.processor, task.test, ev, "test_teacher", new, context="teacher"
    )
    warm["eval_s"] = time.perf_counter() - t0
    progress.write(
        f"[{name}] teacher warm start: {warm['steps']} steps in {warm['wall_s']:.0f}s; held-out "
        f"student context {student_ctx:.1f}%, teacher context {teacher_ctx:.1f}%"
    )
    return {"warm": warm, "student_context": student_ctx, "teacher_context": teacher_ctx}


def _tokens(run: dict) -> int:
    return run.get("rollout_tokens", 0)


def compare_table(results: dict[str, dict]) -> str:
    """Markdown: per task and method, test accuracy per seed and the mean, and the tokens; the
    teachers' own accuracies first."""
    rows = [
        "| task | method | test accuracy per seed | mean | rollout tokens (mean) "
        "| train time (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rows.append(f"| {name} | student warm start | | {r['before']:.1f} | | |")
        rows.append(f"| {name} | its own weights, privileged context | | {r['teacher']:.1f} | | |")
        big = r.get("teacher_model")
        if big:
            rows.append(
                f"| {name} | bigger teacher, student context | | {big['student_context']:.1f} | | |"
            )
            rows.append(
                f"| {name} | bigger teacher, privileged context | | {big['teacher_context']:.1f} | | |"
            )
        for m in METHODS:
            runs = [v[m] for v in r["seeds"].values() if m in v]
            if not runs:
                continue
            accs = [x["test_acc"] for x in runs]
            rows.append(
                f"| {name} | after {LABELS[m]} | {', '.join(f'{a:.1f}' for a in accs)} "
                f"| {sum(accs) / len(accs):.1f} | {sum(map(_tokens, runs)) / len(runs):,.0f} "
                f"| {sum(x['train_s'] for x in runs) / len(runs):.0f}s |"
            )
    return "\n".join(rows)


def plot_tokens(results: dict[str, dict], path: str | Path) -> Path:
    """Validation accuracy against cumulative rollout tokens, one panel per task, one line per
    seed and method (``opsd_mm.demo.compare.plot_tokens`` with this comparison's methods)."""
    from opsd_mm.demo.compare import plot_tokens as plot

    return plot(results, path, methods=METHODS, colours=COLOURS, labels=LABELS)
