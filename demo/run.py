"""``opsd-mm demo``: OPSD teaching tiny models something only the privileged context knows.

Offline and self-contained: for each task (``opsd_mm.demo.tasks``) the demo builds a tiny model
from the project's fixtures, warm-starts it with our own SFT loop (``opsd_mm.demo.sft``: a skill in a
known phrasing from the student context, the target phrasing only from the teacher context),
then for each seed trains (a) OPSD with the real ``Trainer`` (fixed teacher = the warm start with
the LoRA adapter off) and (b) an SFT baseline on the reference solutions for the same number of
steps, and evaluates with the evaluation harness (``opsd_mm.eval.runner``) on the held-out test
split. It prints a progress bar with the time left, a table, PASS/FAIL lines for the learning
thresholds and the wall time (reported, never judged), and writes ``results.json`` and
``accuracy_loss.png`` into the run directory.

One seed by default, so that a first ``make demo`` takes minutes on a 2-core CPU; ``--full``
runs three. The warm start is shared by the seeds: it is one fixed-seed checkpoint per task (as
a checked-in checkpoint would be), so the seeds measure the spread of OPSD itself - LoRA init,
rollout sampling and data order. ``--task-seed`` changes the data and warm start.

Processors and evaluation reach it through ``Wiring``, handed in by ``cli.py`` (the one module
that wires the packages together); the trainer comes from ``opsd_mm.train.build``, the path
``opsd-mm train`` uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import ModelConfig, ProcessorConfig, load_config, save_config
from opsd_mm.config.sections import ViewOpConfig
from opsd_mm.demo.report import checks, table, time_line
from opsd_mm.demo.tasks import (
    N_TEST,
    N_VAL,
    TaskData,
    make_text_task,
    make_vision_task,
    make_vision_view_task,
    solution,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Per-task settings, chosen by measurement (see docs/performance.md, the demo's lab notebook)."""

    tiny: str  # fixture name for opsd_mm.model.tiny.resolve_tiny
    threshold: float  # required OPSD gain over the warm start, accuracy points
    warm_pre_steps: int  # student-only SFT steps before the mixture (learn the skill first)
    warm_steps: int  # mixture SFT steps (student + teacher format)
    warm_lr: float
    steps: int  # OPSD (and SFT-baseline) optimizer steps
    opsd: tuple[str, ...]  # config overrides for the OPSD run
    processor: tuple[tuple[str, Any], ...] = ()
    batch: int = 32  # warm-start SFT sequences per step


RECIPES: dict[str, Recipe] = {
    "text": Recipe(
        tiny="text",
        threshold=15.0,
        warm_pre_steps=0,
        # 300 mixture steps: 200 leave the teacher context at 32% (gap and gain FAIL), 400 cost
        # another 25 s for a larger gain than the threshold needs (docs/performance.md).
        warm_steps=300,
        warm_lr=3e-3,
        steps=60,
        # The project's default loss, generalized JSD(0.5); 8 prompts x 4 rollouts per step
        # (the worked chain is ~23 tokens, so several samples per prompt explore the operators).
        opsd=(
            "loss.divergence=jsd",
            "loss.beta=0.5",
            "rollout.n=4",
            "trainer.batch_size=8",
            "trainer.lr=2e-3",
        ),
    ),
    "vision": Recipe(
        tiny="qwen2.5-vl",
        threshold=10.0,
        # Counting is learned in a jump after a plateau at the majority count; student-only
        # steps first get it past the plateau before the teacher-format mixture.
        # (100 + 150 warm-start steps and 120 OPSD steps cost ~120 s less but leave counting
        # unlearned in the known phrasing: OPSD gain +2.7, FAIL; docs/performance.md.)
        warm_pre_steps=250,
        warm_steps=300,
        warm_lr=3e-3,
        steps=150,
        # 24 sequences per warm-start step (was 32): a quarter cheaper, and counting is still
        # learned (known phrasing 84.7%); with it OPSD gained +61 points instead of +33.
        batch=24,
        # One rollout per prompt (the completion is fixed but for the colour and the count), so
        # each step sees 32 different images; mapping codes to colours needs many images.
        opsd=(
            "loss.divergence=jsd",
            "loss.beta=0.5",
            "rollout.n=1",
            "trainer.batch_size=32",
            "trainer.lr=2e-3",
            # Teacher prompts are 60-150 tokens: length-sorted micro-batches of <= 1000 padded
            # tokens halve the teacher forward; the prompts of the 1000 training examples are
            # rendered once instead of about five times.
            "trainer.micro_batch_tokens=1000",
            # Packed, as when these figures were measured (trainer.packing=auto pads token
            # budgets on a CPU): the demo's numbers stay reproducible.
            "trainer.packing=true",
            "processor.prompt_cache=2048",
        ),
        # One 28 px grid cell = one merged vision token; keep the images unresized.
        processor=(("min_pixels", 28 * 28), ("max_pixels", 28 * 28 * 64)),
    ),
}
# The vision task with its privilege in the teacher's pixels (the coded colour's cells outlined)
# and no privileged text; otherwise the vision recipe, except that its token budgets are padded
# (trainer.packing=auto on a CPU), as when its figures were measured.
RECIPES["vision_view"] = replace(
    RECIPES["vision"],
    opsd=tuple(o for o in RECIPES["vision"].opsd if o != "trainer.packing=true"),
    processor=(
        *RECIPES["vision"].processor,
        ("teacher_template", "question_only_v1"),
        # A 3 px black outline inside each coded cell (the grid lines are 1 px grey).
        ("teacher_view", [ViewOpConfig("mark", color="black", width=3)]),
    ),
)
MAKE_TASK = {
    "text": make_text_task,
    "vision": make_vision_task,
    "vision_view": make_vision_view_task,
}

DEFAULT_SEEDS = "0"  # one seed: the default `make demo` fits 5 minutes of an idle 2-core CPU
FULL_SEEDS = "0,1,2"  # --full: the spread of OPSD over seeds

QUICK = dict(
    warm_pre_steps=4, warm_steps=6, steps=2, n_test=8, n_val=4, n_warm=16, n_train=16, eval_every=1
)


# Seconds per step of each phase, and per evaluated item, measured at 1 thread on the project's
# machine. Only their ratios matter: the progress bar weighs the work by them, so that its
# estimate of the time left (tqdm's, from the rate so far) holds across phases and machines.
STEP_COST = {
    ("text", "warm"): 0.24,
    ("text", "opsd"): 0.58,
    ("text", "sft"): 0.14,
    ("vision", "warm"): 0.30,
    ("vision", "opsd"): 0.79,
    ("vision", "sft"): 0.19,
    ("vision_view", "warm"): 0.30,
    ("vision_view", "opsd"): 0.79,
    ("vision_view", "sft"): 0.19,
}
# --compare-teachers: the 4-layer teacher's warm-start step and a distillation step from it,
# relative to the student's (estimates: twice the layers in the SFT step and the teacher forward).
TEACHER_COST = {"warm": 1.8, "run": 1.3}
EVAL_ITEM_COST = {"text": 0.008, "vision": 0.015, "vision_view": 0.015}


class Progress:
    """One bar over the whole demo, in estimated seconds of work, with tqdm's time-left estimate.
    Messages go through ``write`` so that they print above the bar."""

    def __init__(self, total: float, enabled: bool = True) -> None:
        from tqdm import tqdm

        # Counted in integer milli-units of work, so that float sums never step past the total.
        self.done = 0.0
        self.bar = tqdm(
            total=max(1, round(total * 1000)),
            disable=not enabled,
            mininterval=1.0,
            bar_format="demo {percentage:3.0f}%|{bar}| elapsed {elapsed}, left ~{remaining}",
        )

    def add(self, amount: float) -> None:
        # The total is an estimate: never step past it (tqdm warns, and the time left goes
        # negative); a run costlier than planned stays at 100% until it ends.
        self.done += amount
        step = min(round(self.done * 1000), self.bar.total) - self.bar.n
        if step > 0:
            self.bar.update(step)

    def write(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(msg)

    def close(self) -> None:
        self.bar.close()


def planned_work(
    name: str, plan: TaskPlan, n_seeds: int, reward_runs: int = 0, teacher_runs: int = 0
) -> float:
    """Estimated seconds of one task (the progress bar's total): warm start, its four
    evaluations, then per seed OPSD and SFT with their validation and test evaluations (and
    the runs of --compare-rewards and --compare-teachers, with the bigger teacher's warm
    start)."""
    recipe, steps, eval_every = plan.recipe, plan.steps, plan.eval_every
    n_test, n_val = plan.sizes.get("n_test", N_TEST), plan.sizes.get("n_val", N_VAL)
    item = EVAL_ITEM_COST[name]
    warm = (recipe.warm_pre_steps + recipe.warm_steps) * STEP_COST[name, "warm"]
    warm += (3 * n_test + n_val) * item
    n_val_evals = -(-steps // eval_every)
    per_run = (n_val_evals * n_val + n_test) * item
    runs = steps * (STEP_COST[name, "opsd"] + STEP_COST[name, "sft"]) + 2 * per_run
    runs += reward_runs * (steps * STEP_COST[name, "opsd"] + per_run)  # --compare-rewards
    if teacher_runs:  # --compare-teachers
        from opsd_mm.demo.teachers import TEACHER_WARM_FACTOR

        steps_warm = recipe.warm_pre_steps + recipe.warm_steps * TEACHER_WARM_FACTOR
        warm += steps_warm * STEP_COST[name, "warm"] * TEACHER_COST["warm"] + 2 * n_test * item
        runs += teacher_runs * (steps * STEP_COST[name, "opsd"] * TEACHER_COST["run"] + per_run)
    return warm + n_seeds * runs


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=int, default=None, help="OPSD and SFT-baseline steps (default: per task)"
    )
    parser.add_argument(
        "--seeds", default=None, help=f"comma-separated OPSD seeds (default: {DEFAULT_SEEDS})"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"the table of docs/demo.md: seeds {FULL_SEEDS} (unless --seeds is given), ~3x the time",
    )
    parser.add_argument(
        "--tasks",
        default="text,vision,vision_view",
        help="comma-separated: text, vision, vision_view (the privilege in the teacher's "
        "pixels; see docs/demo.md)",
    )
    parser.add_argument("--run-dir", default="runs/demo", help="where outputs go (replaced)")
    parser.add_argument("--task-seed", type=int, default=0, help="seed of data and warm start")
    parser.add_argument(
        "--eval-every", type=int, default=20, help="validation accuracy every N training steps"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on a few items: a pipeline check"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the tiny models gain ~25%% from a second thread on an idle "
        "machine, but stall badly when another process competes for the cores)",
    )
    parser.add_argument("--tiny-cache", default=None, help="cache dir of the tiny models")
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes: warm starts and training runs side by side (0: one per core, "
        "up to the jobs that can run at once; 1: all in this process, one after the other)",
    )
    parser.add_argument(
        "--compare-rewards",
        action="store_true",
        help="also train GRPO (verifiable reward only) and the OPSD + reward hybrid with the same "
        f"steps and rollouts, and plot accuracy against rollout tokens; seeds {FULL_SEEDS} unless "
        "--seeds is given (demo/compare.py)",
    )
    parser.add_argument(
        "--compare-teachers",
        action="store_true",
        help="also warm-start a bigger (4-layer) teacher and distil the student from it in the "
        "student's context and in the privileged one, beside OPSD, with the same steps and "
        "rollouts; plot accuracy against rollout tokens (demo/teachers.py)",
    )


@dataclass(frozen=True)
class Wiring:
    """What the demo needs from processors and evaluation, handed in by ``cli.py`` (the one
    module that wires them into the modality-agnostic core): ``build_processor`` is
    ``opsd_mm.processors.build_processor`` and ``evaluate`` is
    ``opsd_mm.eval.examples.evaluate_examples``."""

    build_processor: Callable[..., Any]
    evaluate: Callable[..., float]
    # cli.build_reward (loss.reward -> opsd_mm.eval.rewards), for --compare-rewards.
    build_reward: Callable[..., Any] | None = None


# ----------------------------------------------------------------------------- phases


def _processor(path: str, recipe: Recipe, wiring: Wiring) -> Any:
    from opsd_mm.model.load import model_type_of

    settings = dict(
        student_template="plain",
        teacher_template="hint_v1",
        max_prompt_tokens=256,
        max_teacher_prompt_tokens=512,
    )
    cfg = ProcessorConfig(**{**settings, **dict(recipe.processor)})
    return wiring.build_processor(cfg, path, model_type_of(path))


def warm_start(
    task: TaskData,
    recipe: Recipe,
    base: str,
    processor: Any,
    out: Path,
    seed: int = 0,
    tick: Callable[[dict], None] | None = None,
) -> dict:
    """Full fine-tuning of the random tiny model: the skill in the known phrasing (student
    context), then the mixture with the target phrasing in the teacher context. Saved as a
    self-contained model directory (weights + the base's tokenizer/processor files)."""
    from opsd_mm.demo.sft import make_items, train_sft
    from opsd_mm.model.load import load_model

    t0 = time.perf_counter()
    model = load_model(base, ModelConfig(dtype="float32"))
    for p in model.parameters():
        p.requires_grad_(True)
    student = make_items(processor, task.warm_student, "student", solution)
    teacher = make_items(processor, task.warm_teacher, "teacher", solution)
    history = []
    if recipe.warm_pre_steps:
        history += train_sft(
            model,
            processor,
            student,
            steps=recipe.warm_pre_steps,
            batch_size=recipe.batch,
            lr=recipe.warm_lr,
            seed=2 * seed,
            warmup_steps=min(20, recipe.warm_pre_steps // 4),
            on_step=tick,
        )
    history += train_sft(
        model,
        processor,
        student + teacher,
        steps=recipe.warm_steps,
        batch_size=recipe.batch,
        lr=recipe.warm_lr,
        seed=2 * seed + 1,
        warmup_steps=min(20, recipe.warm_steps // 4),
        on_step=tick,
    )
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(base).iterdir():  # tokenizer / processor files; weights and config come next
        if f.is_file() and f.suffix != ".safetensors" and f.name != ".complete":
            shutil.copy(f, out / f.name)
    model.save_pretrained(out)
    return {"steps": len(history), "loss": [h["loss"] for h in history], "wall_s": _since(t0)}


def run_opsd(
    task: TaskData,
    recipe: Recipe,
    warm: Path,
    processor: Any,
    seed: int,
    steps: int,
    run_dir: Path,
    eval_every: int,
    curve0: float,
    wiring: Wiring,
    tick: Callable[[], None] = lambda: None,
    extra: tuple[str, ...] = (),
) -> dict:
    """OPSD with the project's Trainer on in-memory examples (as ``build_trainer`` wires it),
    stepping ``train_step`` so that validation accuracy can be measured along the way.
    ``extra``: overrides after the recipe's (GRPO and the hybrid: ``loss.reward_weight``...;
    a bigger teacher: ``teacher.kind=model``...)."""
    from opsd_mm.model.forward import unwrap
    from opsd_mm.train.build import set_seed, trainer_from_examples
    from opsd_mm.train.metrics import MetricsWriter

    cfg = load_config(
        None,
        [
            f"model.name_or_path={warm}",
            "model.dtype=float32",
            "model.lora.r=16",
            "model.lora.alpha=32",
            f"rollout.max_new_tokens={task.max_new_tokens}",
            "rollout.temperature=1.0",
            "teacher.kind=fixed",
            f"trainer.max_steps={steps}",
            "trainer.micro_batch_size=32",
            "trainer.lr_schedule=cosine",
            f"trainer.warmup_steps={min(5, steps // 4)}",
            "trainer.save_every=0",
            "logging.progress=false",
            f"seed={seed}",
            f"run_dir={run_dir}",
            *recipe.opsd,
            *extra,
        ],
    )
    t0 = time.perf_counter()
    set_seed(seed)  # the LoRA initialisation follows the seed
    reward = wiring.build_reward(cfg) if wiring.build_reward else None
    trainer = trainer_from_examples(
        cfg,
        processor,
        task.train,
        model_path=str(warm),
        reward=reward,
        build_processor=wiring.build_processor,  # a model teacher's own processor
    )
    model = unwrap(trainer.model)  # what the evaluations generate with
    save_config(cfg, run_dir / "config.yaml")
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    rollouts_per_step = cfg.trainer.batch_size * cfg.rollout.n
    curve, losses, tokens, eval_s = [(0, curve0)], [], 0, 0.0
    curve_tokens, rewards = [0], []  # cumulative rollout tokens at each curve point
    try:
        while trainer.step < steps:
            metrics = trainer.train_step()
            tick()
            writer.write(metrics)
            losses.append(metrics["loss"])
            rewards.append(metrics.get("reward/mean"))
            tokens += round(metrics["completion_len_mean"] * rollouts_per_step)
            if trainer.step % eval_every == 0 or trainer.step == steps:
                t_eval = time.perf_counter()
                acc = wiring.evaluate(
                    model,
                    processor,
                    task.val,
                    run_dir / "eval",
                    f"val_step{trainer.step}",
                    task.max_new_tokens,
                )
                curve.append((trainer.step, acc))
                curve_tokens.append(tokens)
                eval_s += time.perf_counter() - t_eval
    finally:
        writer.close()
    train_s = _since(t0) - eval_s
    test = wiring.evaluate(
        model, processor, task.test, run_dir / "eval", "test", task.max_new_tokens
    )
    return {
        "test_acc": test,
        "val_curve": curve,
        "loss": losses,
        "rollout_tokens": tokens,
        "curve_tokens": curve_tokens,
        "train_reward": rewards,
        "train_s": train_s,
    }


def run_sft_baseline(
    task: TaskData,
    recipe: Recipe,
    warm: Path,
    processor: Any,
    seed: int,
    steps: int,
    run_dir: Path,
    eval_every: int,
    curve0: float,
    wiring: Wiring,
    tick: Callable[[], None] = lambda: None,
) -> dict:
    """SFT on the reference solutions from the student context: same LoRA, learning rate,
    schedule and steps as OPSD, as many sequences per step as OPSD has rollouts."""
    from opsd_mm.config import LoraConfig
    from opsd_mm.demo.sft import make_items, train_sft
    from opsd_mm.model.load import load_model, setup_trainable
    from opsd_mm.train.build import set_seed

    opsd_cfg = load_config(None, list(recipe.opsd))
    mcfg = ModelConfig(dtype="float32", lora=LoraConfig(r=16, alpha=32))
    t0 = time.perf_counter()
    set_seed(seed)
    model = setup_trainable(load_model(str(warm), mcfg), mcfg)
    items = make_items(processor, task.train, "student", solution)
    curve, eval_s = [(0, curve0)], 0.0
    curve_tokens, tokens = [0], 0  # cumulative training (target) tokens at each curve point

    def on_step(record: dict) -> None:
        nonlocal eval_s, tokens
        tick()
        tokens += record["tokens"]
        step = record["step"]
        if step % eval_every == 0 or step == steps:
            t_eval = time.perf_counter()
            acc = wiring.evaluate(
                model, processor, task.val, run_dir / "eval", f"val_step{step}", task.max_new_tokens
            )
            curve.append((step, acc))
            curve_tokens.append(tokens)
            model.train()
            eval_s += time.perf_counter() - t_eval

    history = train_sft(
        model,
        processor,
        items,
        steps=steps,
        batch_size=opsd_cfg.trainer.batch_size * opsd_cfg.rollout.n,
        lr=opsd_cfg.trainer.lr,
        seed=seed,
        warmup_steps=min(5, steps // 4),
        on_step=on_step,
    )
    train_s = _since(t0) - eval_s
    test = wiring.evaluate(
        model, processor, task.test, run_dir / "eval", "test", task.max_new_tokens
    )
    return {
        "test_acc": test,
        "val_curve": curve,
        "loss": [h["loss"] for h in history],
        "train_tokens": tokens,
        "curve_tokens": curve_tokens,
        "train_s": train_s,
    }


def machine_info() -> dict:
    """What decides the demo's numbers on a CPU: torch's SIMD kernels (the capability), the CPU,
    the torch version and the threads. The 1-minute load average says how shared it was."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "load_1min": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _since(t0: float) -> float:
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class TaskPlan:
    recipe: Recipe
    sizes: dict[str, int]  # split sizes handed to make_*_task (quick mode only)
    steps: int
    eval_every: int


def task_plan(name: str, args: argparse.Namespace) -> TaskPlan:
    recipe = RECIPES[name]
    sizes: dict[str, int] = {}
    if args.quick:
        recipe = replace(
            recipe,
            warm_pre_steps=min(recipe.warm_pre_steps, QUICK["warm_pre_steps"]),
            warm_steps=QUICK["warm_steps"],
            steps=QUICK["steps"],
            batch=8,
        )
        sizes = {k: QUICK[k] for k in ("n_test", "n_val", "n_warm")}
        if name != "text":
            sizes["n_train"] = QUICK["n_train"]
    steps = args.steps if args.steps is not None else recipe.steps
    eval_every = QUICK["eval_every"] if args.quick else args.eval_every
    return TaskPlan(recipe, sizes, steps, eval_every)


def seed_list(args: argparse.Namespace) -> list[int]:
    """--seeds if given, else one seed (three with --full); --quick keeps the first."""
    full = args.full or getattr(args, "compare_rewards", False)
    spec = args.seeds if args.seeds is not None else FULL_SEEDS if full else DEFAULT_SEEDS
    seeds = [int(s) for s in str(spec).split(",") if s.strip()]
    return seeds[:1] if args.quick else seeds


def _counted(evaluate: Callable[..., float], cost: float, progress: Progress) -> Callable:
    def wrapped(model: Any, processor: Any, examples: list, *rest: Any, **kw: Any) -> float:
        acc = evaluate(model, processor, examples, *rest, **kw)
        progress.add(cost * len(examples))
        return acc

    return wrapped


@dataclass
class TaskSetup:
    """What every phase of one task needs, built once per process (cheap: the data are
    generated, the processor loads a tokenizer)."""

    name: str
    plan: TaskPlan
    task: TaskData
    processor: Any
    wiring: Wiring  # its evaluate counts progress
    task_dir: Path


def setup_task(
    name: str, plan: TaskPlan, args: argparse.Namespace, run_dir: Path, wiring: Wiring, progress
) -> TaskSetup:
    from opsd_mm.model.tiny import resolve_tiny

    if name not in RECIPES:
        raise ValueError(f"unknown demo task {name!r}; choose from {sorted(RECIPES)}")
    wiring = replace(wiring, evaluate=_counted(wiring.evaluate, EVAL_ITEM_COST[name], progress))
    task = MAKE_TASK[name](seed=args.task_seed, **plan.sizes)
    base = str(resolve_tiny(plan.recipe.tiny, args.tiny_cache))
    return TaskSetup(
        name, plan, task, _processor(base, plan.recipe, wiring), wiring, run_dir / name
    )


def prepare_task(setup: TaskSetup, args: argparse.Namespace, progress) -> dict:
    """The warm start (into a fresh task directory) and its four evaluations; what the
    training runs of every seed start from."""
    from opsd_mm.model.load import load_model
    from opsd_mm.model.tiny import resolve_tiny

    name, task, processor, evaluate = setup.name, setup.task, setup.processor, setup.wiring.evaluate
    recipe = setup.plan.recipe
    shutil.rmtree(setup.task_dir, ignore_errors=True)
    warm_dir = setup.task_dir / "warm_start"
    progress.write(f"[{name}] warm start: SFT of tiny:{recipe.tiny} ...")
    warm_cost = STEP_COST[name, "warm"]
    warm = warm_start(
        task,
        recipe,
        str(resolve_tiny(recipe.tiny, args.tiny_cache)),
        processor,
        warm_dir,
        seed=args.task_seed,
        tick=lambda _record: progress.add(warm_cost),
    )
    t_eval = time.perf_counter()
    model = load_model(str(warm_dir), ModelConfig(dtype="float32")).eval()
    ev = setup.task_dir / "eval_warm_start"
    new = task.max_new_tokens
    before = evaluate(model, processor, task.test, ev, "test_student", new)
    teacher = evaluate(model, processor, task.test, ev, "test_teacher", new, context="teacher")
    val0 = evaluate(model, processor, task.val, ev, "val_student", new)
    known = evaluate(
        model, processor, task.warm_student[: len(task.test)], ev, "known_phrasing", new
    )
    del model
    warm["eval_s"] = _since(t_eval)
    progress.write(
        f"[{name}] warm start: {warm['steps']} steps in {warm['wall_s']:.0f}s; held-out student "
        f"{before:.1f}%, teacher context {teacher:.1f}% (known phrasing, student: {known:.1f}%)",
    )
    big = None
    if getattr(args, "compare_teachers", False):
        from opsd_mm.demo.teachers import warm_start_teacher

        cost = STEP_COST[name, "warm"] * TEACHER_COST["warm"]
        big = warm_start_teacher(setup, args, progress, cost)
    data = {
        "train": len(task.train),
        "val": len(task.val),
        "test": len(task.test),
        "warm_student": len(task.warm_student),
        "warm_teacher": len(task.warm_teacher),
        **task.meta,
    }
    return {
        "warm": warm,
        "before": before,
        "teacher": teacher,
        "val0": val0,
        "known": known,
        "data": data,
        "teacher_model": big,
    }


def methods(args: argparse.Namespace) -> list[str]:
    """The training runs of each seed: OPSD and the SFT baseline, with --compare-rewards GRPO
    and the hybrid (``opsd_mm.demo.compare``), with --compare-teachers the two distillations
    from the bigger teacher (``opsd_mm.demo.teachers``)."""
    from opsd_mm.demo.compare import REWARD_RUNS
    from opsd_mm.demo.teachers import TEACHER_RUNS

    rewards = REWARD_RUNS if getattr(args, "compare_rewards", False) else ()
    teachers = TEACHER_RUNS if getattr(args, "compare_teachers", False) else ()
    return ["opsd", "sft", *rewards, *teachers]


def run_method(setup: TaskSetup, prepared: dict, seed: int, method: str, progress) -> dict:
    """One training run of one seed from the warm start, with its validation curve and test
    accuracy."""
    name, plan = setup.name, setup.plan
    out_dir = setup.task_dir / f"seed{seed}" / method
    common = (setup.task, plan.recipe, setup.task_dir / "warm_start", setup.processor, seed)
    rest = (plan.steps, out_dir, plan.eval_every, prepared["val0"], setup.wiring)
    if method == "sft":
        tick = lambda: progress.add(STEP_COST[name, "sft"])  # noqa: E731
        return run_sft_baseline(*common, *rest, tick=tick)
    from opsd_mm.demo.compare import REWARD_RUNS, reward_overrides
    from opsd_mm.demo.teachers import teacher_overrides

    cost = STEP_COST[name, "opsd"]
    if method in REWARD_RUNS:
        extra = reward_overrides(name, method)
    elif method != "opsd":
        extra = teacher_overrides(setup.task_dir, setup.processor.cfg, method)
        cost *= TEACHER_COST["run"]
    else:
        extra = ()
    out = run_opsd(*common, *rest, tick=lambda: progress.add(cost), extra=extra)
    if method != "opsd":
        progress.write(
            f"[{name}] seed {seed}: {method} {out['test_acc']:.1f}% "
            f"({out['rollout_tokens']} rollout tokens, {out['train_s']:.0f}s)"
        )
    return out


def seed_line(name: str, prepared: dict, seed: int, runs: dict) -> str:
    opsd, sft = runs["opsd"], runs["sft"]
    return (
        f"[{name}] seed {seed}: student {prepared['before']:.1f}% -> OPSD {opsd['test_acc']:.1f}% "
        f"({opsd['train_s']:.0f}s), SFT {sft['test_acc']:.1f}% ({sft['train_s']:.0f}s)"
    )


def task_result(name: str, plan: TaskPlan, prepared: dict, per_seed: dict, wall_s: float) -> dict:
    """The task's entry of results.json (the split sizes come with ``prepared``, so the
    parent of the worker processes need not build the task again)."""
    recipe = plan.recipe
    return {
        "task": name,
        "model": f"tiny:{recipe.tiny}",
        "steps": plan.steps,
        "threshold": recipe.threshold,
        "recipe": {k: v for k, v in recipe.__dict__.items()},
        "data": prepared["data"],
        "warm_start": prepared["warm"],
        "before": prepared["before"],
        "teacher": prepared["teacher"],
        "known_phrasing": prepared["known"],
        "teacher_model": prepared.get("teacher_model"),
        "seeds": per_seed,
        "wall_s": wall_s,
    }


def run_task(
    name: str,
    plan: TaskPlan,
    args: argparse.Namespace,
    seeds: list[int],
    run_dir: Path,
    wiring: Wiring,
    progress: Progress,
) -> dict:
    """One task in this process: warm start, then every seed's runs in turn."""
    t0 = time.perf_counter()
    setup = setup_task(name, plan, args, run_dir, wiring, progress)
    prepared = prepare_task(setup, args, progress)
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = {m: run_method(setup, prepared, seed, m, progress) for m in methods(args)}
        progress.write(seed_line(name, prepared, seed, per_seed[seed]))
    return task_result(name, plan, prepared, per_seed, _since(t0))


def quiet(threads: int) -> None:
    """The demo's process settings (the parent's and each task worker's): no per-model
    progress bars or known deprecation chatter, and ``threads`` torch threads."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    for noisy in ("opsd_mm.model.load", "opsd_mm.processors.vision_cache"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)


def run_demo(args: argparse.Namespace, wiring: Wiring) -> int:
    quiet(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in RECIPES]
    if unknown or not tasks:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {sorted(RECIPES)}")
    seeds = seed_list(args)
    if not seeds:
        raise SystemExit("--seeds: give at least one seed, e.g. --seeds 0")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plans = {name: task_plan(name, args) for name in tasks}
    compare = getattr(args, "compare_rewards", False)
    if compare and wiring.build_reward is None:
        raise SystemExit("--compare-rewards needs a reward (cli.py wires build_reward)")
    reward_runs = 2 if compare else 0
    teachers = getattr(args, "compare_teachers", False)
    teacher_runs = 2 if teachers else 0
    from opsd_mm.demo.workers import default_jobs, run_parallel
    from opsd_mm.model.tiny import resolve_tiny

    runs = methods(args)
    jobs = args.jobs or default_jobs(len(plans) * len(seeds) * len(runs))
    if jobs < 1:
        raise SystemExit(f"--jobs: must be >= 1 (0: one per core), got {jobs}")
    for plan in plans.values():  # built here once, not by two workers at the same time
        resolve_tiny(plan.recipe.tiny, args.tiny_cache)
        if teachers:
            resolve_tiny(f"{plan.recipe.tiny}-teacher", args.tiny_cache)
    work = {n: planned_work(n, p, len(seeds), reward_runs, teacher_runs) for n, p in plans.items()}
    progress = Progress(sum(work.values()))
    t0 = time.perf_counter()
    try:
        if jobs > 1:
            done = run_parallel(plans, args, seeds, run_dir, wiring, progress, jobs, runs, work)
            results = {name: task_result(name, plan, *done[name]) for name, plan in plans.items()}
        else:
            results = {
                name: run_task(name, plan, args, seeds, run_dir, wiring, progress)
                for name, plan in plans.items()
            }
    finally:
        progress.close()
    total_s = _since(t0)
    lines = checks(results, args.quick)
    text = table(results)
    machine = machine_info() | {"task_processes": jobs}
    print()
    print(text)
    print(f"\n{time_line(total_s, machine)}")
    for line in lines:
        print(line)
    from opsd_mm.demo.plot import plot_results

    plot_results(results, run_dir / "accuracy_loss.png")
    if compare:
        from opsd_mm.demo.compare import compare_table, plot_tokens

        text += "\n\n" + compare_table(results)
        print(f"\n{compare_table(results)}")
        plot_tokens(results, run_dir / "accuracy_tokens.png")
        print(f"accuracy vs rollout tokens: {run_dir / 'accuracy_tokens.png'}")
    if teachers:
        from opsd_mm.demo import teachers as compare_teachers

        text += "\n\n" + compare_teachers.compare_table(results)
        print(f"\n{compare_teachers.compare_table(results)}")
        compare_teachers.plot_tokens(results, run_dir / "accuracy_tokens_teachers.png")
        print(f"accuracy vs rollout tokens: {run_dir / 'accuracy_tokens_teachers.png'}")
    summary = {
        "args": vars(args) | {"func": None},
        "machine": machine,
        "wall_s": total_s,
        "table": text,
        "checks": lines,
        "tasks": results,
    }
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"results: {run_dir / 'results.json'}; plot: {run_dir / 'accuracy_loss.png'}")
    return 1 if any(line.startswith("FAIL") for line in lines) else 0
