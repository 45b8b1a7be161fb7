"""The OPSD training loop: a plain class on accelerate, read top to bottom in ``train_step``.

One step: sample -> pair -> teacher forward -> student forward -> loss -> backward/step ->
teacher update -> engine sync -> log -> checkpoint. The step's batch is built by
``opsd_mm.train.batches`` (draw, generate, advantages, pair, micro-batches); the loss of one
micro-batch by ``opsd_mm.loss.micro_batch``; the teachers are ``opsd_mm.teacher`` (the
student's own weights, a separate model, or several routed by a data column:
``opsd_mm.teacher.routing.Teachers``); saving and resuming by ``opsd_mm.train.state`` and
``opsd_mm.train.checkpoint``. With ``teacher.scoring=server`` the teacher forward is one
request per server per step, right after pairing (``opsd_mm.teacher.scoring``).

Failure behaviour (docs/failure-behaviour.md): a fresh run refuses a used run_dir, any run an
unwritable one; resume falls back past an unloadable newest checkpoint (or one whose state.json
does not check) and applies changed optimizer settings with a warning; SIGTERM/SIGINT finish the step, checkpoint and raise
:class:`~opsd_mm.train.signals.TrainingInterrupted`; a step without usable completions, or with
a non-finite loss, is a bad step, and ``trainer.max_bad_steps_in_row`` of them abort; skipped
rows and examples are counted by reason (``skipped/load/*``, ``skipped/run/*``) in every
metrics row.

Loss normalisation: a step's rollouts are split into micro-batches; each micro-batch's per-token
losses are summed and divided by the number of loss tokens of the WHOLE step across all
processes (times the process count, since DDP averages gradients). Gradient accumulation and
several processes therefore give the same gradients as one big batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import RunConfig, config_to_dict, flatten_config, save_config
from opsd_mm.config.sections import view_is_random
from opsd_mm.data.stream import ExampleStream
from opsd_mm.errors import UserError
from opsd_mm.loss.divergences import DivergenceOut, loss_mask
from opsd_mm.loss.importance import importance_metrics
from opsd_mm.loss.micro_batch import micro_batch_loss
from opsd_mm.loss.rewards import Reward
from opsd_mm.model.forward import unwrap
from opsd_mm.model.packing import packed_attention, resolve_packing
from opsd_mm.rollout.base import RolloutEngine, ScoringEngine
from opsd_mm.rollout.prefetch import RolloutBatch, RolloutPrefetcher, staleness_metrics
from opsd_mm.teacher.model import ModelTeacher
from opsd_mm.teacher.routing import Teachers
from opsd_mm.teacher.scoring import teacher_logprobs
from opsd_mm.teacher.weights import Teacher
from opsd_mm.train import batches
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train import state as run_state
from opsd_mm.train.batches import Counters, MicroBatch, StepPlan
from opsd_mm.train.distributed import raise_together
from opsd_mm.train.metrics import (
    MetricsWriter,
    PhaseTimer,
    logprob_gap,
    pad_logprobs,
    repetition_rate,
    summarize_tokens,
    truncate_metrics,
)
from opsd_mm.train.prompt_cache import PromptCache
from opsd_mm.train.signals import StopSignals, TrainingInterrupted
from opsd_mm.train.view_gain import ViewGain
from opsd_mm.types import Example, Pair, PairBatch, Processor, Prompt, TeacherLogprobs, view_seed

log = logging.getLogger(__name__)


class BadStepsError(UserError):
    """Raised after ``trainer.max_bad_steps_in_row`` consecutive bad steps (non-finite loss or
    gradient norm, or no usable completion). A user-facing stop (one line naming the last good
    checkpoint, exit 2): the usual cause is a setting such as a learning rate that diverges."""

    kind = "training stopped"


class Trainer:
    """Owns the model, optimizer, teacher, engine and data stream of one run."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        model: torch.nn.Module,
        processor: Processor,
        engine: RolloutEngine,
        examples: Sequence[Example],
        accelerator: Any,
        load_skips: dict[str, int] | None = None,
        reward: Reward | None = None,
        model_teachers: dict[str, ModelTeacher] | None = None,
    ) -> None:
        """Built by ``opsd_mm.train.build``, which resolves ``cfg`` and makes the run's one
        Accelerator, the model, the processor and the engine. ``load_skips``: rows skipped or
        dropped while loading the data, by reason (logged as ``skipped/load/<reason>``).
        ``reward``: scores completions for ``loss.reward_weight`` (``opsd_mm.loss.rewards``;
        cli.py builds it from ``loss.reward``); required when the weight is > 0.
        ``model_teachers``: the separate teachers of ``teacher.kind=model`` or ``teachers``, by
        name, loaded by ``opsd_mm.train.build`` (``opsd_mm.teacher.model``)."""
        self.cfg = cfg
        tc = cfg.trainer
        self.accelerator = acc = accelerator
        self.run_dir = Path(cfg.run_dir)
        self.processor = processor
        # Rendered prompts, kept across epochs when processor.prompt_cache > 0. The methods are
        # looked up at each call, so a processor whose method is replaced later is followed.
        # The teacher prompt is its teacher's rendering (opsd_mm.teacher.routing): an example
        # always routes to the same teacher, so one cache holds every teacher's prompts.
        size = cfg.processor.prompt_cache
        self.student_prompt = PromptCache(lambda ex: self.processor.student_prompt(ex), size)
        self.teacher_prompt = PromptCache(self._render_teacher_prompt, size)
        self.engine = engine
        # The teachers: the student's own weights (built from the initial weights, before any
        # checkpoint is loaded: a fixed teacher's copies are not checkpointed, so a resumed run
        # must rebuild them from these) and the separate models, with the route between them.
        self.teacher = Teacher(cfg.teacher, model)
        self.teachers = Teachers(cfg, self.teacher, model_teachers or {}, processor)
        # teacher.scoring=server: teacher log-probs come from a server (the student's own
        # weights from the generation server, a model teacher from its own), once per step.
        on_server = [n for n in self.teachers.names if self.teachers.on_server(n)]
        self.score_on_server = bool(on_server) and cfg.loss.distill_weight > 0
        self_on_server = any(self.teachers.uses_student(n) for n in on_server)
        if self.score_on_server and self_on_server and not isinstance(engine, ScoringEngine):
            raise UserError(
                f"teacher.scoring=server: the {type(engine).__name__} rollout engine cannot "
                "score a teacher; use rollout.engine=vllm_server"
            )
        if cfg.loss.reward_weight > 0 and reward is None:
            raise UserError(
                f"loss.reward_weight={cfg.loss.reward_weight} needs a reward: pass reward= to "
                "Trainer (cli.py builds it from loss.reward)"
            )
        self.reward = reward if cfg.loss.reward_weight > 0 else None
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.adam_beta1, tc.adam_beta2)
        )
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            tc.lr_schedule,
            self.optimizer,
            num_warmup_steps=tc.warmup_steps,
            num_training_steps=tc.schedule_steps or tc.max_steps,
        )
        # Model and optimizer are prepared together: FSDP2 replaces the parameters with sharded
        # DTensors and must re-point the optimizer at them. The scheduler stays unprepared: an
        # accelerate-prepared scheduler steps once per process, which would make the LR schedule
        # depend on the process count.
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        # FSDP2 only (a no-op for other modules): generate() runs below the root module's
        # forward, whose hook gathers the root's own shards (embeddings, final norm, head).
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(self.model, "generate")
        if self._sharded:  # the teacher's tensors sharded like the parameters
            self.teacher.follow_sharding(unwrap(self.model))
        self.teachers.prepare(acc, unwrap(self.model))  # model teachers: sharded or placed
        self.stream = ExampleStream(
            examples,
            tc.batch_size,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        self.step = 0
        self.engine_version = 0  # the trainer step whose weights the engine holds
        # rollout.async: the next step's batch generates on a thread while this one trains.
        self.prefetcher = RolloutPrefetcher(engine) if cfg.rollout.async_ else None
        self.counters = Counters(
            cfg.processor.bad_image_policy, load_skips, reward=self.reward is not None
        )
        if self.teachers.routed:  # examples paired per teacher, over the run
            self.counters.values.update({f"routed/{n}": 0 for n in self.teachers.names})
        # The view gain (logging.view_gain_every, loss.view_weighting): opsd_mm.train.view_gain.
        self.view_gain = ViewGain(cfg, processor, self.counters, acc)
        self._bad_in_row = 0
        self.run_id: str | None = None
        self.signals = StopSignals()
        self.timer_cuda = acc.device.type == "cuda"
        half = acc.mixed_precision in ("bf16", "fp16") or getattr(
            unwrap(self.model), "dtype", None
        ) in (torch.bfloat16, torch.float16)
        packing = resolve_packing(
            unwrap(self.model),
            tc.packing,
            acc.device,
            half=half,
            micro_batch_tokens=tc.micro_batch_tokens,
        )
        self.packing, self.packed_attention = packing.packed, packing.attention
        log.info("trainer.packing=%s: %s", str(tc.packing).lower(), packing.reason)

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, Any]]:
        """Run until ``trainer.max_steps``; returns the logged metrics of this call."""
        cfg, acc = self.cfg, self.accelerator
        self.run_id = run_state.claim_run_dir(cfg, acc)
        if cfg.trainer.resume:
            self.resume()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            # Rows past the starting step came from a run that died after its last checkpoint
            # (or from an earlier run in this directory): drop them, so no step appears twice.
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            truncate_metrics(self.run_dir / "samples.jsonl", self.step)
            if cfg.logging.report_to:
                acc.init_trackers(cfg.logging.project, config=flatten_config(config_to_dict(cfg)))
        writer = MetricsWriter(self.run_dir / "metrics.jsonl") if acc.is_main_process else None
        history = []
        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.trainer.max_steps,
            initial=self.step,
            desc="opsd",
            disable=not (cfg.logging.progress and acc.is_main_process),
        )
        try:
            with self.signals.catching(next_step=lambda: self.step + 1):
                while self.step < cfg.trainer.max_steps:
                    metrics = self.train_step()
                    history.append(metrics)
                    self._log(metrics, writer)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4g}", len=f"{metrics['completion_len_mean']:.0f}"
                    )
                    self._checkpoint_or_stop()
        finally:
            bar.close()
            if self.prefetcher is not None:
                self.prefetcher.close()
            getattr(self.engine, "release", lambda: None)()  # a generation server's run claim
            if writer:
                writer.close()
            if cfg.logging.report_to:
                acc.end_training()
        return history

    def train_step(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        timer = PhaseTimer(sync_cuda=self.timer_cuda)
        t_start = time.perf_counter()

        # 1. sample: the student context only (rollout.async: generated while the previous
        # step trained; the next step's batch starts generating here).
        batch = self._rollouts(timer)
        for e, what in batch.skipped:
            self.counters.skip_example(e, what)
        # 1b. reward (loss.reward_weight > 0): one advantage per completion, GRPO's.
        with timer.phase("reward") if self.reward is not None else nullcontext():
            advantages_P_G, reward_stats = batches.advantages(
                self.reward,
                self.processor.tokenizer,
                batch.examples,
                batch.rollouts_P_G,
                self.counters,
                reduce_sum=lambda t: acc.reduce(t.to(acc.device), "sum").cpu(),
            )

        # 2. pair: each example's teacher context (its teacher's rendering), followed by the
        # same completion ids.
        paired = batches.pair_rollouts(
            self.processor, self.teacher_prompt, batch, advantages_P_G, self.counters
        )
        self._count_routes(paired.pairs)
        # 2b. teacher.scoring=server: every row's teacher log-probs, one request per server
        # (the generation server holds this step's weights: it is synced after every step).
        if self.score_on_server:
            with timer.phase("teacher_score"):
                self.teachers.score_on_servers(
                    paired.pairs, cfg.loss.top_k, self.engine, self._teacher_of
                )
        # 2c. the view gain (logging.view_gain_every, loss.view_weighting): each example's
        # teacher context once more, in the student's view of the images (or
        # processor.gain_view).
        in_student_view = self.view_gain.prompts(self.step + 1, batch, paired)
        # The step's micro-batches (one teacher's rows each), padded to the busiest process per
        # teacher, and its global token count.
        plan = batches.plan_micro_batches(
            paired, cfg, self.packing, acc, self.teachers.names, self._teacher_of
        )

        # 3-5. teacher forward, student forward, loss and backward, per micro-batch.
        loss_total, terms_total, outs, logprobs = self._forward_backward(
            plan, timer, in_student_view
        )

        # 6. optimizer step, unless the step is bad.
        with timer.phase("optimizer"):
            loss_value, grad_norm, good = self._optimizer_step(loss_total, empty=not plan.micro)
        self.step += 1

        # 7-8. teacher update and engine weight sync (rollout.async: at the next step's start,
        # once the generation in flight has finished).
        if good:
            self.teacher.update(unwrap(self.model), self.step)
        if self.prefetcher is None and self.step % cfg.rollout.sync_every == 0:
            with timer.phase("sync"):
                self._sync_engine()

        # 9. metrics.
        wall = time.perf_counter() - t_start
        completions = [p.completion_ids for p in plan.pairs]
        lengths = [len(c) for c in completions] or [0]
        div_N = torch.cat([o.div_N for o in outs]) if outs else torch.zeros(0)
        engine_N = torch.cat([e for e, _ in logprobs]) if logprobs else torch.zeros(0)
        trainer_N = torch.cat([t for _, t in logprobs]) if logprobs else torch.zeros(0)
        finish = paired.finish_reasons
        metrics: dict[str, Any] = {
            "step": self.step,
            "loss": loss_value,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "skipped": not good,
            "loss_tokens": plan.tokens_global,
            **self._term_metrics(terms_total),
            **reward_stats,
            **summarize_tokens(div_N, "divergence"),
            "clip_fraction": _mean_of(outs, "clipped_N"),
            # mean |log p_engine - log p_trainer| on sampled tokens (vLLM; NaN with hf/fused)
            "rollout/logprob_gap": logprob_gap(engine_N, trainer_N),
            # optimizer steps between the sampling weights and the trained ones (rollout.async: 1)
            **staleness_metrics(batch.rollouts_P_G, self.step - 1),
            **self._importance_metrics(engine_N, trainer_N),
            "student_entropy": _mean_of(outs, "student_entropy_N"),
            "teacher_entropy": _mean_of(outs, "teacher_entropy_N"),
            "completion_len_mean": sum(lengths) / len(lengths),
            "completion_len_max": max(lengths),
            "truncation_rate": finish.count("length") / max(len(finish), 1),
            "repetition_rate": repetition_rate(completions),
            "tokens_per_s": sum(lengths) / wall,
            "step_time": wall,
            **timer.as_metrics(),
            **self.teachers.step_metrics(),
            **self.view_gain.metrics,
            **self.counters.values,
        }
        self._last_step = (batch.examples, plan.pairs, div_N)  # for _log_samples
        return metrics

    # ------------------------------------------------------------------ the step's parts

    def _rollouts(self, timer: PhaseTimer) -> RolloutBatch:
        """This step's batch. Synchronous: drawn and sampled now, from the weights synced
        last. ``rollout.async``: the batch generated while the previous step trained (the
        first step samples now); then the engine gets the current weights and the next step's
        batch is submitted, in that order (``opsd_mm.rollout.prefetch``)."""
        step, cfg = self.step + 1, self.cfg
        if self.prefetcher is None:
            with timer.phase("rollout"):
                return batches.generate(self.engine, self._draw(step), cfg)
        with timer.phase("rollout"):  # the wait for the generation that overlapped training
            batch = self.prefetcher.take(step) or batches.generate(
                self.engine, self._draw(step), cfg
            )
        if step < cfg.trainer.max_steps:
            if self.step % cfg.rollout.sync_every == 0 and self.engine_version != self.step:
                with timer.phase("sync"):
                    self._sync_engine()
            ahead = self._draw(step + 1)
            self.prefetcher.submit(ahead, cfg.rollout.n, batches.sampling_for(cfg, step + 1))
        return batch

    def _draw(self, step: int) -> RolloutBatch:
        render = self._student_renderer(step)
        return batches.draw(
            self.stream, step, lambda ex: self._routed_student_prompt(ex, render), self.counters
        )

    def _routed_student_prompt(self, ex: Example, render: Any) -> Prompt:
        """The student prompt of an example that has a teacher (``render``: the step's
        renderer): routed before its rollouts are sampled, so an unrouted example (skipped,
        counted) costs none."""
        self.teachers.route(ex)
        return render(ex)

    def _render_teacher_prompt(self, ex: Example) -> Prompt:
        """``ex``'s teacher context as its teacher renders it, named in ``meta["teacher"]``."""
        name = self.teachers.route(ex)
        prompt = self.teachers.teacher_prompt(name, ex)
        prompt.meta["teacher"] = name
        return prompt

    def _teacher_of(self, pair: Pair) -> str:
        """The name of the teacher that scores ``pair``."""
        return pair.teacher.meta.get("teacher", self.teachers.names[0])

    def _count_routes(self, pairs: Sequence[Pair]) -> None:
        """With a ``teachers`` mapping: the examples paired this step, by teacher, into the
        run's counters (``routed/NAME``: examples, over the run)."""
        if not self.teachers.routed:
            return
        seen: dict[str, str] = {p.example_id: self._teacher_of(p) for p in pairs}
        for name in seen.values():
            self.counters.add(f"routed/{name}")

    def _student_renderer(self, step: int) -> Any:
        """How the batch trained at ``step`` renders its student prompts: with a random student
        view (``random_crop``, ``p`` < 1), each example's operations draw from
        ``view_seed(seed, step, example id)`` - the same pixels for all its samples, on any
        number of processes and after a resume - and are rendered afresh (never from the prompt
        cache); otherwise the (cached) rendering."""
        if not view_is_random(self.cfg.processor.student_view):
            return self.student_prompt
        seed = self.cfg.seed
        return lambda ex: self.processor.student_prompt(ex, seed=view_seed(seed, step, ex.id))

    def _forward_backward(
        self,
        plan: StepPlan,
        timer: PhaseTimer,
        in_student_view: dict[int, Prompt] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[DivergenceOut], list[tuple[torch.Tensor, ...]]]:
        """Teacher forward, student forward, loss and backward for every micro-batch of the
        plan (gradients reduced across processes in the last backward only). Returns the summed
        loss and the two weighted terms (distillation, reward policy gradient), the per-token
        stats of each real micro-batch, and its (engine, trainer) log-probs where the engine
        reports them. ``in_student_view``: the view gain is due (``opsd_mm.train.view_gain``)."""
        acc = self.accelerator
        self.model.train()
        loss_total = torch.zeros((), device=acc.device)
        terms_total = torch.zeros(2, device=acc.device)
        outs: list[DivergenceOut] = []
        logprobs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (engine_N, trainer_N)
        # The processors' step contexts (VL: each image encoded once for the whole step, by the
        # student's tower and by each model teacher's own); packed forwards (and their
        # backwards) in the attention trainer.packing chose.
        with (
            self.processor.step_context(unwrap(self.model)),
            self.teachers.step_context(),
            packed_attention(unwrap(self.model), self.packed_attention),
        ):
            factors: dict[int, torch.Tensor] = {}
            if in_student_view is not None and plan.micro:
                factors = self.view_gain.factors(
                    plan, in_student_view, self.model, self.teacher, self.packing, timer
                )
            for i, mb in enumerate(plan.micro):
                batch = self.teachers.collate(mb.teacher, mb.pairs, mb.foreign).to(acc.device)
                last = i == len(plan.micro) - 1
                with acc.no_sync(self.model) if not last else nullcontext():
                    weight_N = torch.cat([factors[id(p)] for p in mb.pairs]) if factors else None
                    loss, out, terms, engine_N = self._micro_step(mb, batch, plan, timer, weight_N)
                    if mb.padding:
                        loss = loss * 0.0
                    with timer.phase("student"):
                        acc.backward(loss)
                if not mb.padding:
                    loss_total += loss.detach()
                    terms_total += terms
                    outs.append(out)
                    self.teachers.record(mb.teacher, len(mb.pairs), out.div_N)
                    if engine_N is not None:
                        logprobs.append((engine_N, out.student_logprob_N.cpu()))
        return loss_total, terms_total, outs, logprobs

    def _micro_step(
        self,
        mb: MicroBatch,
        batch: PairBatch,
        plan: StepPlan,
        timer: PhaseTimer,
        token_weight_N: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DivergenceOut, torch.Tensor, torch.Tensor | None]:
        """One micro-batch's loss (``opsd_mm.loss.micro_batch``), in autocast: the forward of
        the micro-batch's teacher (none when a server scored it), the student forward, the loss
        times its normalisation; also the two weighted terms and the engine's log-probs of its
        tokens. ``token_weight_N``: ``loss.view_weighting``'s factor on each loss token."""
        cfg = self.cfg
        mask_BC = loss_mask(batch.completion_mask_BC, cfg.loss.skip_first_tokens)
        engine_N = self._engine_logprobs(mb, batch, mask_BC)
        teacher_N: TeacherLogprobs | None = None
        if self.score_on_server and self.teachers.on_server(mb.teacher) and not mb.foreign:
            teacher_N = teacher_logprobs(mb.pairs, mask_BC, cfg.loss.top_k)
        with self.accelerator.autocast():
            loss, out, terms = micro_batch_loss(
                batch,
                self.model,
                self.teachers.forward(mb.teacher, mb.foreign),
                self._loss_scale(mask_BC, plan),
                cfg.loss,
                timer,
                engine_N if cfg.loss.importance_clip is not None else None,
                torch.tensor(mb.advantages, device=self.accelerator.device),
                packed=self.packing,
                teacher_logprobs=teacher_N,
                token_weight_N=token_weight_N,
            )
        return loss, out, terms, engine_N

    def _loss_scale(self, mask_BC: torch.Tensor, plan: StepPlan) -> float:
        """The factor on this micro-batch's summed per-token loss (``loss.normalize``).

        Gradients are averaged over processes (DDP/FSDP), hence the ``num_processes`` factor in
        ``step_tokens``: sum / global token count, every token of the step weighing the same.
        ``micro_batch_mean``: this micro-batch's token mean / micro-batches per process, so the
        step's loss is the mean of the micro-batch means, as in a transformers-Trainer-based
        reference (each micro-batch's ``batchmean`` divided by the accumulation steps).
        """
        if self.cfg.loss.normalize == "micro_batch_mean":
            return 1.0 / (max(int(mask_BC.sum()), 1) * max(len(plan.micro), 1))
        return self.accelerator.num_processes / max(plan.tokens_global, 1.0)

    def _engine_logprobs(
        self, mb: MicroBatch, batch: PairBatch, mask_BC: torch.Tensor
    ) -> torch.Tensor | None:
        """The rollout engine's log-probs of the micro-batch's loss tokens ([N] on the CPU, NaN
        where unknown), or None when no rollout reports any. Read once per micro-batch: they
        feed ``loss.importance_clip`` and the rollout/trainer log-prob gap metric."""
        if not any(p.logprobs for p in mb.pairs):
            return None
        width_C = batch.completion_ids_BC.shape[1]
        return pad_logprobs([p.logprobs for p in mb.pairs], width_C)[mask_BC.cpu()]

    def _optimizer_step(self, loss_total: torch.Tensor, empty: bool) -> tuple[float, float, bool]:
        """Clip and step, unless the step is bad: no usable completion (every one rejected, on
        some process: nothing to learn from; a diverged model samples ids outside the
        vocabulary), or a non-finite loss or gradient norm. A bad step changes no weights and
        does not advance the LR schedule; its loss is logged as NaN (null in metrics.jsonl).
        Returns (loss, gradient norm, good); ``trainer.max_bad_steps_in_row`` bad steps in a
        row raise :class:`BadStepsError`."""
        acc = self.accelerator
        loss_value = acc.reduce(loss_total, "sum").item() / acc.num_processes
        grad_norm = self._clip_grad_norm()
        good = math.isfinite(loss_value) and math.isfinite(grad_norm) and not empty
        if good:
            self.optimizer.step()
            self.scheduler.step()
            self._bad_in_row = 0
        else:
            self._bad_in_row += 1
            if empty:
                loss_value = math.nan
                self.counters.add("empty_steps")
                log.warning(
                    "step %d: no usable completion (%d rejected); step skipped",
                    self.step + 1,
                    self.counters.values["rejected_completions"],
                )
            else:
                self.counters.add("nonfinite_steps")
                log.warning("step %d: non-finite loss/grad norm; step skipped", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        limit = self.cfg.trainer.max_bad_steps_in_row
        if self._bad_in_row >= limit:
            c = self.counters.values
            raise BadStepsError(
                f"{self._bad_in_row} bad steps in a row ({c['nonfinite_steps']} non-finite, "
                f"{c['empty_steps']} without a usable completion so far; limit "
                f"trainer.max_bad_steps_in_row={limit}): the model has probably diverged "
                f"(lower trainer.lr?); last good checkpoint: "
                f"{ckpt.latest_checkpoint(self.run_dir)}"
            )
        return loss_value, grad_norm, good

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.trainer.max_grad_norm
        # accelerate's clip handles sharded (DTensor) gradients under FSDP2; the norm is global.
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _sync_engine(self) -> None:
        """The engine samples from the current weights from now on (version: this step)."""
        self.engine.sync_weights(unwrap(self.model), version=self.step)
        self.engine_version = self.step

    # ------------------------------------------------------------------ logging

    def _log(self, metrics: dict[str, Any], writer: MetricsWriter | None) -> None:
        """The step's metrics row (every ``logging.log_every`` steps) and rendered samples
        (every ``logging.samples_every``), from the main process."""
        lg = self.cfg.logging
        if writer and self.step % lg.log_every == 0:
            writer.write(metrics)
            if lg.report_to:
                self.accelerator.log(metrics, step=self.step)
        if writer and lg.samples_every and self.step % lg.samples_every == 0:
            self._log_samples()

    def _log_samples(self) -> None:
        """``logging.samples_n`` rendered samples of the last step to ``samples.jsonl`` (and to
        a tensorboard tracker as text); see ``opsd_mm/train/samples.py``."""
        from opsd_mm.train import samples

        examples, pairs, div_N = self._last_step
        records = samples.sample_records(
            self.step,
            examples,
            pairs,
            self.processor.tokenizer,
            self.cfg.logging.samples_n,
            div_N=div_N,
            skip_first_tokens=self.cfg.loss.skip_first_tokens,
        )
        samples.write_samples(self.run_dir / "samples.jsonl", records)
        if self.cfg.logging.report_to:
            samples.log_to_trackers(self.accelerator, records, self.step)

    def _importance_metrics(self, engine_N: torch.Tensor, trainer_N: torch.Tensor) -> dict:
        """``loss.importance_clip``'s weights over the step's tokens (``importance/*``);
        nothing when the clip is off."""
        clip = self.cfg.loss.importance_clip
        return {} if clip is None else importance_metrics(trainer_N, engine_N, clip)

    def _term_metrics(self, terms_total: torch.Tensor) -> dict[str, float]:
        """The step's two weighted loss terms (summed over processes like ``loss``), only when
        the reward path is on."""
        if self.reward is None:
            return {}
        acc = self.accelerator
        t = acc.reduce(terms_total, "sum") / acc.num_processes
        return {"loss/distill": t[0].item(), "loss/reward_pg": t[1].item()}

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_or_stop(self) -> None:
        """Save every ``trainer.save_every`` steps and at the last one; after a stop signal
        (agreed by every process in one collective, so all save together) save and raise
        :class:`TrainingInterrupted`."""
        tc = self.cfg.trainer
        saved = bool(tc.save_every) and (
            self.step % tc.save_every == 0 or self.step == tc.max_steps
        )
        if saved:
            self.save()
        signum = self.signals.requested(self.accelerator)
        if signum:
            if not saved:
                self.save()
            path = ckpt.checkpoint_dir(self.run_dir) / ckpt.step_name(self.step)
            raise TrainingInterrupted(signum, self.step, path)

    def save(self) -> Path | None:
        """Checkpoint from the main process; every process contributes its RNG state."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        acc.wait_for_everyone()
        rng_states = gather_object([ckpt.rng_state()])
        # rollout.async: the next step's batch, sampled from weights this checkpoint does not
        # hold, is recorded with the data position before it (opsd_mm.rollout.prefetch).
        ahead = self.prefetcher.wait() if self.prefetcher is not None else None
        state = run_state.CheckpointState(
            step=self.step,
            run_id=self.run_id,
            consumed=(ahead.data_before if ahead else self.stream.state())["consumed"],
            counters=dict(self.counters.values),
            bad_in_row=self._bad_in_row,
            num_processes=acc.num_processes,
            global_batch_size=self.cfg.trainer.batch_size * acc.num_processes,
            settings=run_state.recorded_settings(self.cfg, acc.num_processes),
            ahead=(ahead.step, ahead.rollouts_P_G) if ahead else None,
        )
        common = {
            "model": unwrap(self.model),
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "state": state.to_dict(),
            "rng_states": rng_states,
            "keep_last": self.cfg.trainer.keep_last,
            "run_id": self.run_id,
        }
        what = f"writing checkpoint step {self.step}"
        if self._sharded:  # every process writes its shard
            return ckpt.save_sharded_checkpoint(
                self.run_dir,
                self.step,
                is_main=acc.is_main_process,
                barrier=acc.wait_for_everyone,
                settle=lambda error: raise_together(error, what),
                teacher_state=self.teacher.ema or None,
                **common,
            )
        path, error = None, None
        if acc.is_main_process:
            try:
                path = ckpt.save_checkpoint(
                    self.run_dir,
                    self.step,
                    teacher_state=self.teacher.state_dict() or None,
                    **common,
                )
            except Exception as e:  # every process stops, none waits (raise_together)
                error = e
        raise_together(error, what)
        return path

    @property
    def _sharded(self) -> bool:
        """Checkpoints are sharded (``torch.distributed.checkpoint``) under FSDP2."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _load(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """Restore checkpoint ``path`` into this trainer's model, optimizer and scheduler (and
        an EMA teacher's tensors); (``state.json``, teacher state)."""
        common = {
            "model": unwrap(self.model),
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "process_index": self.accelerator.process_index,
        }
        if ckpt.is_sharded(path):  # FSDP2's; loads on any process count and layout
            state = ckpt.load_sharded_checkpoint(
                path, teacher_state=self.teacher.ema or None, **common
            )
            return state, None
        if self._sharded:
            raise RuntimeError(
                "a checkpoint written without FSDP2 cannot be resumed under FSDP2 "
                "(resume it without FSDP2, or start the FSDP2 run from its weights)"
            )
        return ckpt.load_checkpoint(path, **common)

    def resume(self) -> None:
        """Continue from the latest complete checkpoint of this run in run_dir (none: start
        fresh), falling back past unloadable ones (``opsd_mm.train.state.load_newest``).

        The data position is a global example count, so a different process count resumes at
        the same place in the data; the same global batch (batch_size x processes) keeps the
        run identical to an uninterrupted one."""
        from opsd_mm.train.run_dir import read_run_id

        if self.run_id is None:  # resume() called on its own, not from train()
            self.run_id = read_run_id(self.run_dir)
        found = run_state.load_newest(self.run_dir, self.run_id, self._load, self.accelerator)
        if found is None:
            log.warning("trainer.resume: no checkpoint in %s; starting from step 0", self.run_dir)
            return
        path, state, teacher_state = found  # state: checked (run_state.CheckpointState)
        if teacher_state:
            self.teacher.load_state_dict(teacher_state)
        self.step = state.step
        acc = self.accelerator
        run_state.apply_settings(
            run_state.saved_settings(state),
            self.cfg,
            acc.num_processes,
            self.optimizer,
            self.scheduler,
            self.step,
            path,
        )
        self.stream.load_state({"consumed": state.consumed})
        self.counters.restore(state.counters)
        self._bad_in_row = state.bad_in_row
        self._sync_engine()
        if state.ahead and self.prefetcher is not None:  # the batch the run generated ahead
            step, rollouts_P_G = state.ahead
            batch = self._draw(step)
            n = self.cfg.rollout.n
            shape = [len(rs) for rs in rollouts_P_G]
            if shape == [n] * len(batch.prompts):
                batch.rollouts_P_G = rollouts_P_G
                self.prefetcher.put(batch)
            else:  # a changed batch size, process count or rollout.n: sample it again
                log.warning(
                    "%s: the batch generated ahead for step %d has %d prompts x %s rollouts; "
                    "this run's batch has %d prompts x %d (trainer.batch_size, the process "
                    "count or rollout.n changed): sampling it afresh",
                    path,
                    step,
                    len(shape),
                    sorted(set(shape)) if len(set(shape)) > 1 else (shape[0] if shape else 0),
                    len(batch.prompts),
                    n,
                )
                self.prefetcher.submit(batch, n, batches.sampling_for(self.cfg, step))
        elif state.ahead:
            log.info("%s: rollout.async=false samples the batch generated ahead afresh", path)
        log.info("resumed from %s at step %d", path, self.step)


def _mean_of(outs: Sequence[DivergenceOut], name: str) -> float:
    vals = [getattr(o, name) for o in outs]
    vals = [v for v in vals if v.numel()]
    return torch.cat(vals).float().mean().item() if vals else 0.0
