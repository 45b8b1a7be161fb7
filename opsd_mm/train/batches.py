"""One step's batch, from examples to micro-batches.

The trainer's first steps, as functions: :func:`draw` the next examples and their student
prompts, :func:`generate` their rollouts, :func:`advantages` from the reward (when one is on),
:func:`pair_rollouts` with each example's teacher context, and :func:`plan_micro_batches`:
the pairs split into micro-batches, the list padded to the busiest process once.

Nothing is dropped silently: an example whose prompt cannot be built and a completion the
processor rejects are counted by reason in :class:`Counters` (``skipped/run/*``,
``rejected_completions``; the data loader's own skips as ``skipped/load/*``), which every
metrics row and checkpoint carries. ``processor.bad_image_policy=raise`` holds at run time too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opsd_mm.config import RunConfig
from opsd_mm.data.stream import ExampleStream
from opsd_mm.loss.rewards import Reward, group_advantages, reward_metrics
from opsd_mm.model.packing import micro_batches, pair_length
from opsd_mm.rollout.base import RolloutEngine
from opsd_mm.rollout.prefetch import RolloutBatch
from opsd_mm.types import BadImageError, Example, Pair, Processor, Prompt, SamplingConfig

log = logging.getLogger(__name__)


def reason_key(reason: str) -> str:
    """A skip reason as a metrics key part: ``image not found`` -> ``image_not_found``."""
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_") or "other"


class Counters:
    """The run's counters, by name: bad steps, rejected completions, truncated privileged
    texts, examples skipped at load (``skipped/load/<reason>``) and at run time
    (``skipped/run/<reason>``). Logged in every metrics row and saved in every checkpoint."""

    def __init__(
        self, bad_image_policy: str, load_skips: dict[str, int] | None, reward: bool
    ) -> None:
        self.bad_image_policy = bad_image_policy
        self.values: dict[str, int] = {
            "nonfinite_steps": 0,
            "empty_steps": 0,  # steps where every completion was rejected
            "rejected_completions": 0,
            "privileged_truncated": 0,
            "bad_examples": 0,  # examples skipped at run time (by reason: skipped/run/*)
        }
        if reward:  # reward items scored 0 for a failure, over the run
            self.values.update({"reward_timeouts": 0, "reward_failures": 0})
        self.load = {f"skipped/load/{reason_key(r)}": n for r, n in (load_skips or {}).items()}
        self.values.update(self.load)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n

    def raise_if_policy(self, e: ValueError) -> None:
        """``processor.bad_image_policy=raise`` holds at run time too (an image that went
        missing or bad after the load-time check), as does any error marked ``fatal`` by its
        own policy (``teacher.unrouted_policy=raise``)."""
        if isinstance(e, BadImageError) and self.bad_image_policy == "raise":
            raise e
        if getattr(e, "fatal", False):
            raise e

    def skip_example(self, e: ValueError, what: str) -> None:
        """Count an example left out of this step (``skipped/run/bad_image``,
        ``skipped/run/student_prompt``, ``skipped/run/teacher_prompt``, or the error's own
        ``skip_reason``: ``skipped/run/unrouted``)."""
        reason = "bad_image" if isinstance(e, BadImageError) else getattr(e, "skip_reason", what)
        self.add("bad_examples")
        self.add(f"skipped/run/{reason}")

    def reject_completion(self, e: ValueError) -> None:
        self.raise_if_policy(e)
        self.add("rejected_completions")
        log.warning("rejected completion: %s", e)

    def restore(self, saved: dict[str, int]) -> None:
        """A checkpoint's counters; this load's data skips, not the saved run's."""
        self.values.update(saved)
        self.values.update(self.load)


def draw(
    stream: ExampleStream,
    step: int,
    student_prompt: Callable[[Example], Prompt],
    counters: Counters,
) -> RolloutBatch:
    """The next examples of the stream and their student prompts, for trainer step ``step``;
    no rollouts yet. An example whose prompt cannot be built (a bad image under policy
    ``skip`` that slipped past data loading, an over-long question) is logged with its id, left
    out and recorded in ``batch.skipped``, counted when the batch trains (under
    ``rollout.async`` it is drawn one step early)."""
    data_before = stream.state()
    examples, prompts, skipped = [], [], []
    for ex in stream.next_batch():
        try:
            prompt = student_prompt(ex)
        except ValueError as e:
            counters.raise_if_policy(e)
            log.warning("skipped example: %s", e)
            skipped.append((e, "student_prompt"))
            continue
        prompt.meta["key"] = ex.id
        examples.append(ex)
        prompts.append(prompt)
    return RolloutBatch(step, examples, prompts, skipped, data_before)


def sampling_for(cfg: RunConfig, step: int) -> SamplingConfig:
    """Sampling for the batch trained at ``step`` (1-based): its seed depends on the step
    alone, so the async and synchronous loops draw the same rows' seeds."""
    r = cfg.rollout
    return SamplingConfig(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        min_p=r.min_p,
        max_new_tokens=r.max_new_tokens,
        seed=cfg.seed * 1_000_003 + step - 1,
    )


def generate(engine: RolloutEngine, batch: RolloutBatch, cfg: RunConfig) -> RolloutBatch:
    """``batch`` with its ``rollout.n`` rollouts per prompt."""
    batch.rollouts_P_G = engine.generate(
        batch.prompts, cfg.rollout.n, sampling_for(cfg, batch.step)
    )
    return batch


def advantages(
    reward: Reward | None,
    tokenizer: Any,
    examples: Sequence[Example],
    rollouts_P_G: Sequence[Sequence[Any]],
    counters: Counters,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[list[float]], dict[str, float]]:
    """Score each completion with the reward and normalise within its prompt's group
    (``opsd_mm.loss.rewards.group_advantages``); reward metrics summed over processes with
    ``reduce_sum``. Without a reward: all 0 and no metrics."""
    if reward is None:
        return [[0.0] * len(g) for g in rollouts_P_G], {}
    flat_ex = [ex for ex, g in zip(examples, rollouts_P_G) for _ in g]
    texts = [
        tokenizer.decode(r.completion_ids, skip_special_tokens=True)
        for g in rollouts_P_G
        for r in g
    ]
    with torch.no_grad():
        scores = reward(flat_ex, texts) if texts else []
    sizes = {len(g) for g in rollouts_P_G}
    if len(sizes) > 1:
        raise RuntimeError(f"rollout groups of unequal size {sorted(sizes)}")
    n = sizes.pop() if sizes else 0
    r_PG = torch.tensor([s.value for s in scores], dtype=torch.float32).view(-1, max(n, 1))
    adv_PG, zero_P = group_advantages(r_PG)
    stats = reward_metrics(r_PG, zero_P, scores, reduce_sum=reduce_sum)
    counters.add("reward_timeouts", sum(s.failure == "timeout" for s in scores))
    counters.add("reward_failures", sum(s.failure is not None for s in scores))
    return adv_PG.tolist(), stats


@dataclass
class PairedStep:
    """The step's pairs, each with its completion's advantage, and every rollout's finish
    reason (rejected ones included, for the truncation rate)."""

    pairs: list[Pair]
    advantages: list[float]
    finish_reasons: list[str]


def pair_rollouts(
    processor: Processor,
    teacher_prompt: Callable[[Example], Prompt],
    batch: RolloutBatch,
    advantages_P_G: Sequence[Sequence[float]],
    counters: Counters,
) -> PairedStep:
    """Each rollout paired with its example's teacher context (the same completion ids after
    the teacher prompt). An example whose teacher prompt fails (a teacher-only image that does
    not load) is skipped and counted; a completion the processor rejects (one holding image
    tokens) is dropped and counted."""
    out = PairedStep([], [], [])
    groups = zip(batch.examples, batch.prompts, batch.rollouts_P_G, advantages_P_G)
    for ex, prompt, rollouts, adv_G in groups:
        try:
            teacher = teacher_prompt(ex)
        except ValueError as e:
            counters.raise_if_policy(e)
            counters.skip_example(e, "teacher_prompt")
            log.warning("skipped example: %s", e)
            continue
        counters.add("privileged_truncated", int(bool(teacher.meta.get("privileged_truncated"))))
        for r, adv in zip(rollouts, adv_G):
            out.finish_reasons.append(r.finish_reason)
            try:
                pair = processor.pair(ex, r.completion_ids, student=prompt, teacher=teacher)
            except ValueError as e:
                counters.reject_completion(e)
                continue
            pair.logprobs = r.logprobs
            out.pairs.append(pair)
            out.advantages.append(adv)
    return out


@dataclass
class MicroBatch:
    """Rows that go through one forward/backward together, all of one teacher (``teacher``, a
    name of ``opsd_mm.teacher.routing.Teachers``). ``padding``: a repeat of one of this
    process's micro-batches, run with weight 0 so that every process runs as many micro-batches
    of each teacher as the busiest one; ``foreign``: the repeated rows belong to another
    teacher (this process has none of ``teacher``'s)."""

    pairs: list[Pair]
    advantages: list[float]
    padding: bool = False
    teacher: str = "teacher"
    foreign: bool = False


@dataclass
class StepPlan:
    """The step's micro-batches (padded to the busiest process; empty when some process has
    none, and then every process skips the step) and its loss-token count over all
    processes, which normalises every micro-batch's loss."""

    micro: list[MicroBatch]
    tokens_global: float
    # This process's pairs in micro-batch order (the order of the loss's per-token stats).
    pairs: list[Pair]


def plan_micro_batches(
    paired: PairedStep,
    cfg: RunConfig,
    packed: bool,
    accelerator: Any,
    teachers: Sequence[str] = ("teacher",),
    teacher_of: Callable[[Pair], str] | None = None,
) -> StepPlan:
    """Split the step's pairs into micro-batches (``trainer.micro_batch_size`` rows, or a
    ``trainer.micro_batch_tokens`` budget sorted by length), one teacher's rows each, teachers
    in the order of ``teachers`` (``teacher_of(pair)`` names a pair's; None: all are the first),
    and agree on the step's shape over all processes in one collective.

    Every process runs as many micro-batches of each teacher as the busiest one, since a
    sharded model gathers weights in each forward (the student's, and a teacher's under FSDP2)
    and DDP reduces gradients in each process's last backward: a process with fewer repeats its
    last micro-batch of that teacher as padding (weight 0), or, having none of that teacher's
    rows, its last micro-batch of any teacher (``foreign``). If any process has no micro-batch
    at all, every process skips the step (an empty plan)."""
    skip = cfg.loss.skip_first_tokens
    tokens_local = sum(max(0, len(p.completion_ids) - skip) for p in paired.pairs)
    rows = list(zip(paired.pairs, paired.advantages))
    micro_by: dict[str, list[MicroBatch]] = {}
    for name in teachers:
        group = [r for r in rows if teacher_of is None or teacher_of(r[0]) == name]
        if teacher_of is None and name != teachers[0]:
            group = []
        micro_by[name] = [
            MicroBatch([p for p, _ in mb], [a for _, a in mb], teacher=name)
            for mb in micro_batches(
                group,
                cfg.trainer.micro_batch_size,
                cfg.trainer.micro_batch_tokens,
                length=lambda row: pair_length(row[0]),
                packed=packed,
            )
        ]
    counts = [len(micro_by[name]) for name in teachers]
    acc = accelerator
    shape_WS = acc.gather(
        torch.tensor([[tokens_local, sum(counts), *counts]], dtype=torch.float64, device=acc.device)
    )
    tokens_global = shape_WS[:, 0].sum().item()
    own = [mb for name in teachers for mb in micro_by[name]]
    pairs = [p for mb in own for p in mb.pairs]
    if shape_WS[:, 1].min() == 0:
        return StepPlan([], tokens_global, pairs)
    plan: list[MicroBatch] = []
    for j, name in enumerate(teachers):
        mine = micro_by[name]
        busiest = int(shape_WS[:, 2 + j].max().item())
        last = mine[-1] if mine else own[-1]
        pad = MicroBatch(last.pairs, last.advantages, True, name, foreign=not mine)
        plan += mine + [pad] * (busiest - len(mine))
    return StepPlan(plan, tokens_global, pairs)
