"""The OPSD training loop: a plain class on accelerate, read top to bottom in ``train_step``.

sample -> pair -> teacher forward -> student forward -> loss -> backward/step -> teacher update
-> engine sync -> log -> checkpoint. With ``teacher.scoring=server`` the teacher forward is one
request to the generation server per step, right after pairing (``opsd_mm.teacher.scoring``).

Failure behaviour (README "Failure behaviour"): a fresh run refuses a used run_dir
(``opsd_mm/train/run_dir.py``); resume falls back past an unloadable newest checkpoint and applies
changed optimizer settings with a warning; SIGTERM/SIGINT finish the step, checkpoint and raise
:class:`TrainingInterrupted`; a step without usable completions, or with a non-finite loss, is a
bad step, and ``trainer.max_bad_steps_in_row`` of them abort; skipped rows and examples are
counted by reason (``skipped/load/*``, ``skipped/run/*``) in every metrics row.

Loss normalisation: a step's rollouts are split into micro-batches; each micro-batch's per-token
losses are summed and divided by the number of loss tokens of the WHOLE step across all
processes (times the process count, since DDP averages gradients). Gradient accumulation and
several processes therefore give the same gradients as one big batch.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import RunConfig, resolve_config, save_config
from opsd_mm.data.stream import ExampleStream
from opsd_mm.errors import UserError
from opsd_mm.loss.divergences import DivergenceOut, loss_mask
from opsd_mm.loss.importance import importance_metrics
from opsd_mm.loss.micro_batch import micro_batch_loss
from opsd_mm.loss.rewards import Reward, group_advantages, reward_metrics
from opsd_mm.model.forward import unwrap
from opsd_mm.model.packing import micro_batches, packable, pair_length
from opsd_mm.rollout.prefetch import (
    RolloutBatch,
    RolloutPrefetcher,
    rollouts_from_state,
    rollouts_to_state,
    staleness_metrics,
)
from opsd_mm.teacher.scoring import score_pairs, teacher_logprobs
from opsd_mm.teacher.weights import Teacher
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train import run_dir as rundir
from opsd_mm.train.distributed import check_distributed_support, make_accelerator
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
from opsd_mm.types import (
    BadImageError,
    Example,
    Pair,
    PairBatch,
    Processor,
    RolloutEngine,
    SamplingConfig,
    TeacherLogprobs,
)

log = logging.getLogger(__name__)


class BadStepsError(UserError):
    """Raised after ``trainer.max_bad_steps_in_row`` consecutive bad steps (non-finite loss or
    gradient norm, or no usable completion). A user-facing stop (one line naming the last good
    checkpoint, exit 2): the usual cause is a setting such as a learning rate that diverges."""

    kind = "training stopped"


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT: the step in progress finished and a checkpoint was written.
    ``exit_code`` is the shell's 128 + signal number (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped after step {step}; checkpoint {checkpoint}; continue with --resume"
        )


def _reason_key(reason: str) -> str:
    """A skip reason as a metrics key part: ``image not found`` -> ``image_not_found``."""
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_") or "other"


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
        accelerator: Any = None,
        load_skips: dict[str, int] | None = None,
        reward: Reward | None = None,
    ) -> None:
        """Built by ``opsd_mm.train.build`` (which makes the model, processor, engine and the one
        Accelerator). ``load_skips``: rows skipped or dropped while loading the data, by reason
        (the data loader's ``LoadReport.reasons()``); logged as ``skipped/load/<reason>``
        counters. ``reward``: scores completions for ``loss.reward_weight`` (``opsd_mm.loss.rewards``;
        cli.py builds it from ``loss.reward``); required when the weight is > 0."""
        cfg = resolve_config(cfg)
        self.cfg = cfg
        tc = cfg.trainer
        # Normally made by opsd_mm.train.build and passed in; made here only for direct library use.
        self.accelerator = accelerator or make_accelerator(cfg)
        acc = self.accelerator
        check_distributed_support(cfg, acc)
        self.run_dir = Path(cfg.run_dir)
        self.processor = processor
        # Rendered prompts, kept across epochs when processor.prompt_cache > 0. The methods are
        # looked up at each call, so a processor whose method is replaced later is followed.
        size = cfg.processor.prompt_cache
        self.student_prompt = PromptCache(lambda ex: self.processor.student_prompt(ex), size)
        self.teacher_prompt = PromptCache(lambda ex: self.processor.teacher_prompt(ex), size)
        self.engine = engine
        # teacher.scoring=server: the live teacher's log-probs come from the engine's server.
        self.score_on_server = cfg.teacher.scoring == "server" and cfg.loss.distill_weight > 0
        if self.score_on_server and not hasattr(engine, "score"):
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
        # The teacher is built from the initial weights, before any checkpoint is loaded: a fixed
        # teacher's copies are not checkpointed, so a resumed run must rebuild them from these.
        self.teacher = Teacher(cfg.teacher, model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=tc.lr,
            weight_decay=tc.weight_decay,
            betas=(tc.adam_beta1, tc.adam_beta2),
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
        self.counters: dict[str, int] = {
            "nonfinite_steps": 0,
            "empty_steps": 0,  # steps where every completion was rejected
            "rejected_completions": 0,
            "privileged_truncated": 0,
            "bad_examples": 0,  # examples skipped at run time (by reason: skipped/run/*)
        }
        if self.reward is not None:  # reward items scored 0 for a failure, over the run
            self.counters.update({"reward_timeouts": 0, "reward_failures": 0})
        self.load_counters = {
            f"skipped/load/{_reason_key(r)}": n for r, n in (load_skips or {}).items()
        }
        self.counters.update(self.load_counters)
        self._bad_in_row = 0
        self.run_id: str | None = None
        self._stop_signal: int | None = None
        self.timer_cuda = acc.device.type == "cuda"
        why_not = packable(unwrap(self.model)) if tc.packing else "trainer.packing=false"
        self.packing = why_not is None
        if tc.packing and why_not:
            log.warning("trainer.packing: padded forwards (%s)", why_not)

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, Any]]:
        """Run until ``trainer.max_steps``; returns the logged metrics of this call."""
        cfg, acc = self.cfg, self.accelerator
        self._claim_run_dir()
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
                from opsd_mm.config import config_to_dict, flatten_config

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
        handlers = self._catch_stop_signals()
        try:
            while self.step < cfg.trainer.max_steps:
                metrics = self.train_step()
                history.append(metrics)
                if writer and self.step % cfg.logging.log_every == 0:
                    writer.write(metrics)
                    if cfg.logging.report_to:
                        acc.log(metrics, step=self.step)
                every = cfg.logging.samples_every
                if writer and every and self.step % every == 0:
                    self._log_samples()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4g}", len=f"{metrics['completion_len_mean']:.0f}"
                )
                saved = bool(cfg.trainer.save_every) and (
                    self.step % cfg.trainer.save_every == 0 or self.step == cfg.trainer.max_steps
                )
                if saved:
                    self.save()
                signum = self._stop_requested()
                if signum:  # every process agrees (one collective), so all save together
                    if not saved:
                        self.save()
                    raise TrainingInterrupted(
                        signum,
                        self.step,
                        ckpt.checkpoint_dir(self.run_dir) / ckpt.step_name(self.step),
                    )
        finally:
            for signum, previous in handlers.items():
                signal.signal(signum, previous)
            bar.close()
            if self.prefetcher is not None:
                self.prefetcher.close()
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
        examples, prompts, rollouts_P_G = batch.examples, batch.prompts, batch.rollouts_P_G
        for e, what in batch.skipped:
            self._count_skip(e, what)
        # 1b. reward (loss.reward_weight > 0): one advantage per completion, GRPO's.
        with timer.phase("reward") if self.reward is not None else nullcontext():
            advantages_P_G, reward_stats = self._advantages(examples, rollouts_P_G)

        # 2. pair: the teacher context, followed by the same completion ids.
        pairs: list[Pair] = []
        advantages: list[float] = []  # per pair
        finish = []
        for ex, prompt, rollouts, adv_G in zip(examples, prompts, rollouts_P_G, advantages_P_G):
            try:
                teacher_prompt = self.teacher_prompt(ex)
            except ValueError as e:  # e.g. a teacher-only image that fails to load
                self._skip_example(e, "teacher_prompt")
                continue
            self.counters["privileged_truncated"] += int(
                bool(teacher_prompt.meta.get("privileged_truncated"))
            )
            for r, adv in zip(rollouts, adv_G):
                finish.append(r.finish_reason)
                try:
                    pair = self.processor.pair(
                        ex, r.completion_ids, student=prompt, teacher=teacher_prompt
                    )
                except ValueError as e:
                    self._raise_if_policy(e)
                    self.counters["rejected_completions"] += 1
                    log.warning("rejected completion: %s", e)
                    continue
                pair.logprobs = r.logprobs
                pairs.append(pair)
                advantages.append(adv)
        # 2b. teacher.scoring=server: every row's teacher log-probs in one request, from the
        # weights the server holds (this step's: it is synced after every optimizer step).
        if self.score_on_server:
            with timer.phase("teacher_score"):
                score_pairs(self.engine, pairs, cfg.loss.top_k)

        # The step's shape over all processes, in one collective. The summed loss-token count
        # normalises every micro-batch's loss. Every process runs as many micro-batches as the
        # busiest one, since a sharded model gathers weights in each forward and DDP reduces
        # gradients in each process's last backward: a process with fewer repeats its last
        # micro-batch with weight 0. If any process has none, every process skips the step.
        skip = cfg.loss.skip_first_tokens
        n_local = sum(max(0, len(p.completion_ids) - skip) for p in pairs)
        # Micro-batches of (pair, advantage): rows, or a token budget (sorted by length).
        micro_rows = micro_batches(
            list(zip(pairs, advantages)),
            cfg.trainer.micro_batch_size,
            cfg.trainer.micro_batch_tokens,
            length=lambda row: pair_length(row[0]),
            packed=self.packing,
        )
        micro = [[p for p, _ in mb] for mb in micro_rows]
        micro_adv = [[a for _, a in mb] for mb in micro_rows]
        pairs = [p for mb in micro for p in mb]  # the micro-batches' order, as div_N's
        shape_W2 = acc.gather(
            torch.tensor([[n_local, len(micro)]], dtype=torch.float64, device=acc.device)
        )
        n_global = shape_W2[:, 0].sum().item()
        n_micro = int(shape_W2[:, 1].max().item()) if shape_W2[:, 1].min() > 0 else 0

        # 3-5. teacher forward, student forward, loss and backward, per micro-batch.
        self.model.train()
        loss_total = torch.zeros((), device=acc.device)
        terms_total = torch.zeros(2, device=acc.device)  # (distill, reward_pg), weighted
        outs: list[DivergenceOut] = []
        logprobs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (engine_N, trainer_N)
        # The processor's step context (VL: each image encoded once for the whole step).
        with self.processor.step_context(unwrap(self.model)):
            for i in range(n_micro):
                padding = i >= len(micro)
                batch = self.processor.collate(micro[min(i, len(micro) - 1)]).to(acc.device)
                sync = i == n_micro - 1
                with acc.no_sync(self.model) if not sync else nullcontext():
                    scale = self._loss_scale(batch, n_global, n_micro)
                    engine_N = self._engine_logprobs(micro[min(i, len(micro) - 1)], batch)
                    rollout_N = engine_N if cfg.loss.importance_clip is not None else None
                    adv_B = torch.tensor(micro_adv[min(i, len(micro) - 1)], device=acc.device)
                    teacher_N = self._scored_teacher(micro[min(i, len(micro) - 1)], batch)
                    loss, out, terms = self._micro_step(
                        batch, scale, timer, rollout_N, adv_B, teacher_N
                    )
                    if padding:
                        loss = loss * 0.0
                    with timer.phase("student"):
                        acc.backward(loss)
                if not padding:
                    loss_total += loss.detach()
                    terms_total += terms
                    outs.append(out)
                    if engine_N is not None:
                        logprobs.append((engine_N, out.student_logprob_N.cpu()))
        # 6. optimizer step, unless the step is bad: no usable completion (every one rejected, on
        # some process: nothing to learn from; a diverged model samples ids outside the
        # vocabulary), or a non-finite loss or gradient norm. A bad step changes no weights and
        # does not advance the LR schedule; its loss is logged as NaN (null in metrics.jsonl).
        with timer.phase("optimizer"):
            loss_value = acc.reduce(loss_total, "sum").item() / acc.num_processes
            grad_norm = self._clip_grad_norm()
            empty = n_micro == 0
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            good = finite and not empty
            if good:
                self.optimizer.step()
                self.scheduler.step()
                self._bad_in_row = 0
            else:
                self._bad_in_row += 1
                if empty:
                    loss_value = math.nan
                    self.counters["empty_steps"] += 1
                    log.warning(
                        "step %d: no usable completion (%d rejected); step skipped",
                        self.step + 1,
                        self.counters["rejected_completions"],
                    )
                else:
                    self.counters["nonfinite_steps"] += 1
                    log.warning("step %d: non-finite loss/grad norm; step skipped", self.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
        limit = cfg.trainer.max_bad_steps_in_row
        if self._bad_in_row >= limit:
            raise BadStepsError(
                f"{self._bad_in_row} bad steps in a row ({self.counters['nonfinite_steps']} "
                f"non-finite, {self.counters['empty_steps']} without a usable completion so far; "
                f"limit trainer.max_bad_steps_in_row={limit}): the model has probably diverged "
                f"(lower trainer.lr?); last good checkpoint: "
                f"{ckpt.latest_checkpoint(self.run_dir)}"
            )
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
        completions = [p.completion_ids for p in pairs]
        lengths = [len(c) for c in completions] or [0]
        div_N = torch.cat([o.div_N for o in outs]) if outs else torch.zeros(0)
        metrics: dict[str, Any] = {
            "step": self.step,
            "loss": loss_value,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "skipped": not good,
            "loss_tokens": n_global,
            **self._term_metrics(terms_total),
            **reward_stats,
            **summarize_tokens(div_N, "divergence"),
            "clip_fraction": _mean_of(outs, "clipped_N"),
            # mean |log p_engine - log p_trainer| on sampled tokens (vLLM; NaN with hf/fused)
            "rollout/logprob_gap": logprob_gap(
                torch.cat([e for e, _ in logprobs]) if logprobs else torch.full((1,), math.nan),
                torch.cat([t for _, t in logprobs]) if logprobs else torch.zeros(1),
            ),
            # optimizer steps between the sampling weights and the trained ones (rollout.async: 1)
            **staleness_metrics(rollouts_P_G, self.step - 1),
            **self._importance_metrics(logprobs),
            "student_entropy": _mean_of(outs, "student_entropy_N"),
            "teacher_entropy": _mean_of(outs, "teacher_entropy_N"),
            "completion_len_mean": sum(lengths) / len(lengths),
            "completion_len_max": max(lengths),
            "truncation_rate": finish.count("length") / max(len(finish), 1),
            "repetition_rate": repetition_rate(completions),
            "tokens_per_s": sum(lengths) / wall,
            "step_time": wall,
            **timer.as_metrics(),
            **self.counters,
        }
        self._last_step = (examples, pairs, div_N)  # for _log_samples
        return metrics

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

    def _loss_scale(self, batch: PairBatch, n_global: float, n_micro: int) -> float:
        """The factor on this micro-batch's summed per-token loss (``loss.normalize``).

        Gradients are averaged over processes (DDP/FSDP), hence the ``num_processes`` factor in
        ``step_tokens``: sum / global token count, every token of the step weighing the same.
        ``micro_batch_mean``: this micro-batch's token mean / micro-batches per process, so the
        step's loss is the mean of the micro-batch means, as in a transformers-Trainer-based
        reference (each micro-batch's ``batchmean`` divided by the accumulation steps).
        """
        cfg, acc = self.cfg, self.accelerator
        if cfg.loss.normalize == "micro_batch_mean":
            mask_BC = loss_mask(batch.completion_mask_BC, cfg.loss.skip_first_tokens)
            return 1.0 / (max(int(mask_BC.sum()), 1) * max(n_micro, 1))
        return acc.num_processes / max(n_global, 1.0)

    def _engine_logprobs(self, pairs: Sequence[Pair], batch: PairBatch) -> torch.Tensor | None:
        """The rollout engine's log-probs of the micro-batch's loss tokens ([N] on the CPU, NaN
        where unknown), or None when no rollout reports any. Read once per micro-batch: they
        feed ``loss.importance_clip`` and the rollout/trainer log-prob gap metric."""
        if not any(p.logprobs for p in pairs):
            return None
        mask_BC = loss_mask(batch.completion_mask_BC, self.cfg.loss.skip_first_tokens)
        width_C = batch.completion_ids_BC.shape[1]
        return pad_logprobs([p.logprobs for p in pairs], width_C)[mask_BC.cpu()]

    def _importance_metrics(
        self, logprobs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, float]:
        """``loss.importance_clip``'s weights over the step's tokens (``importance/*``), from
        the (engine, trainer) log-probs of each micro-batch; nothing when the clip is off."""
        clip = self.cfg.loss.importance_clip
        if clip is None:
            return {}
        engine_N = torch.cat([e for e, _ in logprobs]) if logprobs else torch.zeros(0)
        trainer_N = torch.cat([t for _, t in logprobs]) if logprobs else torch.zeros(0)
        return importance_metrics(trainer_N, engine_N, clip)

    def _micro_step(
        self,
        batch: PairBatch,
        scale: float,
        timer: PhaseTimer,
        rollout_logprob_N: torch.Tensor | None = None,
        advantage_B: torch.Tensor | None = None,
        teacher_logprobs: TeacherLogprobs | None = None,
    ) -> tuple[torch.Tensor, DivergenceOut, torch.Tensor]:
        """Teacher forward (none when ``teacher_logprobs`` came from the server), student
        forward, loss * scale (``opsd_mm/loss/micro_batch.py``), in autocast; also the two weighted loss
        terms (distillation, reward policy gradient), detached."""
        with self.accelerator.autocast():
            return micro_batch_loss(
                batch,
                self.model,
                self.teacher,
                scale,
                self.cfg.loss,
                timer,
                rollout_logprob_N,
                advantage_B,
                packed=self.packing,
                teacher_logprobs=teacher_logprobs,
            )

    def _scored_teacher(self, pairs: Sequence[Pair], batch: PairBatch) -> TeacherLogprobs | None:
        """The micro-batch's server-scored teacher log-probs in loss-token order (None when the
        teacher runs locally)."""
        if not self.score_on_server:
            return None
        mask_BC = loss_mask(batch.completion_mask_BC, self.cfg.loss.skip_first_tokens)
        return teacher_logprobs(pairs, mask_BC, self.cfg.loss.top_k)

    # ------------------------------------------------------------------ helpers

    def _advantages(
        self, examples: Sequence[Example], rollouts_P_G: Sequence[Sequence[Any]]
    ) -> tuple[list[list[float]], dict[str, float]]:
        """Score each completion with the reward and normalise within its prompt's group
        (``opsd_mm.loss.rewards.group_advantages``). Without a reward: all 0 and no metrics."""
        if self.reward is None:
            return [[0.0] * len(g) for g in rollouts_P_G], {}
        tok = self.processor.tokenizer
        flat_ex = [ex for ex, g in zip(examples, rollouts_P_G) for _ in g]
        texts = [
            tok.decode(r.completion_ids, skip_special_tokens=True) for g in rollouts_P_G for r in g
        ]
        with torch.no_grad():
            scores = self.reward(flat_ex, texts) if texts else []
        sizes = {len(g) for g in rollouts_P_G}
        if len(sizes) > 1:
            raise RuntimeError(f"rollout groups of unequal size {sorted(sizes)}")
        n = sizes.pop() if sizes else 0
        r_PG = torch.tensor([s.value for s in scores], dtype=torch.float32).view(-1, max(n, 1))
        adv_PG, zero_P = group_advantages(r_PG)
        acc = self.accelerator
        stats = reward_metrics(  # over every process's prompts
            r_PG, zero_P, scores, reduce_sum=lambda t: acc.reduce(t.to(acc.device), "sum").cpu()
        )
        self.counters["reward_timeouts"] += sum(s.failure == "timeout" for s in scores)
        self.counters["reward_failures"] += sum(s.failure is not None for s in scores)
        return adv_PG.tolist(), stats

    def _term_metrics(self, terms_total: torch.Tensor) -> dict[str, float]:
        """The step's two weighted loss terms (summed over processes like ``loss``), only when
        the reward path is on."""
        if self.reward is None:
            return {}
        acc = self.accelerator
        t = acc.reduce(terms_total, "sum") / acc.num_processes
        return {"loss/distill": t[0].item(), "loss/reward_pg": t[1].item()}

    def _rollouts(self, timer: PhaseTimer) -> RolloutBatch:
        """This step's batch. Synchronous: drawn and sampled now, from the weights synced
        last. ``rollout.async``: the batch generated while the previous step trained (the
        first step samples now); then the engine gets the current weights and the next step's
        batch is submitted, in that order (``opsd_mm.rollout.prefetch``)."""
        step, cfg = self.step + 1, self.cfg
        if self.prefetcher is None:
            with timer.phase("rollout"):
                return self._generate(self._draw(step))
        with timer.phase("rollout"):  # the wait for the generation that overlapped training
            batch = self.prefetcher.take(step) or self._generate(self._draw(step))
        if step < cfg.trainer.max_steps:
            if self.step % cfg.rollout.sync_every == 0 and self.engine_version != self.step:
                with timer.phase("sync"):
                    self._sync_engine()
            ahead = self._draw(step + 1)
            self.prefetcher.submit(ahead, cfg.rollout.n, self._sampling(step + 1))
        return batch

    def _draw(self, step: int) -> RolloutBatch:
        """The next examples of the stream and their student prompts, for trainer step
        ``step``; no rollouts yet."""
        data_before = self.stream.state()
        examples, prompts, skipped = self._student_prompts(self.stream.next_batch())
        return RolloutBatch(step, examples, prompts, skipped, data_before)

    def _generate(self, batch: RolloutBatch) -> RolloutBatch:
        n = self.cfg.rollout.n
        batch.rollouts_P_G = self.engine.generate(batch.prompts, n, self._sampling(batch.step))
        return batch

    def _sync_engine(self) -> None:
        """The engine samples from the current weights from now on (version: this step)."""
        self.engine.sync_weights(unwrap(self.model), version=self.step)
        self.engine_version = self.step

    def _student_prompts(
        self, batch: list[Example]
    ) -> tuple[list[Example], list[Any], list[tuple[ValueError, str]]]:
        """Student prompts for a batch; an example whose prompt cannot be built (a bad image
        under policy ``skip`` that slipped past data loading, an over-long question) is
        logged with its id and left out, and returned as (error, what) for the step that
        trains the batch to count in ``bad_examples``."""
        examples, prompts, skipped = [], [], []
        for ex in batch:
            try:
                prompt = self.student_prompt(ex)
            except ValueError as e:
                self._raise_if_policy(e)
                log.warning("skipped example: %s", e)
                skipped.append((e, "student_prompt"))
                continue
            prompt.meta["key"] = ex.id
            examples.append(ex)
            prompts.append(prompt)
        return examples, prompts, skipped

    def _raise_if_policy(self, e: ValueError) -> None:
        """``processor.bad_image_policy=raise`` holds at run time too (an image that went
        missing or bad after the load-time check)."""
        if isinstance(e, BadImageError) and self.cfg.processor.bad_image_policy == "raise":
            raise e

    def _skip_example(self, e: ValueError, what: str) -> None:
        """Count an example left out of this step and log its error."""
        self._raise_if_policy(e)
        self._count_skip(e, what)
        log.warning("skipped example: %s", e)

    def _count_skip(self, e: ValueError, what: str) -> None:
        """Count a left-out example by reason (``skipped/run/bad_image``,
        ``skipped/run/student_prompt``, ``skipped/run/teacher_prompt``)."""
        reason = "bad_image" if isinstance(e, BadImageError) else what
        key = f"skipped/run/{reason}"
        self.counters["bad_examples"] += 1
        self.counters[key] = self.counters.get(key, 0) + 1

    # ------------------------------------------------------------------ stop signals

    def _catch_stop_signals(self) -> dict[int, Any]:
        """SIGTERM (preemption) and SIGINT (Ctrl-C) only set a flag: the step in progress
        finishes, a checkpoint is written, then :class:`TrainingInterrupted` is raised. A second
        signal gets the previous handler at once. Only possible on the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # second signal: stop now
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
                return
            self._stop_signal = signum
            log.warning(
                "%s: finishing step %d, then writing a checkpoint and stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
                self.step + 1,
            )

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
        return previous

    def _stop_requested(self) -> int:
        """The stop signal any process received (0: none); a collective with >1 process."""
        signum = self._stop_signal or 0
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([signum], dtype=torch.int64, device=self.accelerator.device)
            signum = int(self.accelerator.gather(flag).max().item())
        return signum

    def _sampling(self, step: int) -> SamplingConfig:
        """Sampling for the batch trained at ``step`` (1-based): its seed depends on the step
        alone, so the async and synchronous loops draw the same rows' seeds."""
        r = self.cfg.rollout
        return SamplingConfig(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            min_p=r.min_p,
            max_new_tokens=r.max_new_tokens,
            seed=self.cfg.seed * 1_000_003 + step - 1,
        )

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.trainer.max_grad_norm
        # accelerate's clip handles sharded (DTensor) gradients under FSDP2; the norm is global.
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def save(self) -> Path | None:
        """Checkpoint from the main process; every process contributes its RNG state."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        acc.wait_for_everyone()
        rng_states = gather_object([ckpt.rng_state()])
        # rollout.async: the next step's batch, sampled from weights this checkpoint does not
        # hold, is recorded with the data position before it (opsd_mm.rollout.prefetch).
        ahead = self.prefetcher.wait() if self.prefetcher is not None else None
        state = {
            "data": ahead.data_before if ahead else self.stream.state(),
            "counters": self.counters,
            "bad_in_row": self._bad_in_row,
            "num_processes": acc.num_processes,
            "global_batch_size": self.cfg.trainer.batch_size * acc.num_processes,
            "settings": self._settings(),
        }
        if ahead:
            state["ahead"] = {"step": ahead.step, "rollouts": rollouts_to_state(ahead.rollouts_P_G)}
        common = {
            "model": unwrap(self.model),
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "state": state,
            "rng_states": rng_states,
            "keep_last": self.cfg.trainer.keep_last,
            "run_id": self.run_id,
        }
        if self._sharded:  # every process writes its shard
            return ckpt.save_sharded_checkpoint(
                self.run_dir,
                self.step,
                is_main=acc.is_main_process,
                barrier=acc.wait_for_everyone,
                teacher_state=self.teacher.ema or None,
                **common,
            )
        path = None
        if acc.is_main_process:
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, teacher_state=self.teacher.state_dict() or None, **common
            )
        acc.wait_for_everyone()
        return path

    @property
    def _sharded(self) -> bool:
        """Checkpoints are sharded (``torch.distributed.checkpoint``) under FSDP2."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _claim_run_dir(self) -> None:
        """One run per run_dir (``opsd_mm/train/run_dir.py``). Fresh: refuse a directory that holds
        another run's checkpoints or metrics, unless ``trainer.overwrite`` (then it is renamed to
        ``<run_dir>.replaced-<time>``); write a new run id. Resume: keep the directory's id."""
        tc, acc = self.cfg.trainer, self.accelerator
        if tc.resume:
            self.run_id = rundir.read_run_id(self.run_dir)
        elif not tc.overwrite:
            rundir.check_fresh(self.run_dir)  # on every process: all raise, none waits
        acc.wait_for_everyone()
        if acc.is_main_process:
            if not tc.resume and tc.overwrite:
                moved = rundir.move_aside(self.run_dir)
                if moved is not None:
                    log.warning(
                        "trainer.overwrite: moved the previous %s to %s", self.run_dir, moved
                    )
            if self.run_id is None:
                self.run_id = rundir.new_run_id()
                rundir.write_run_id(self.run_dir, self.run_id)
        acc.wait_for_everyone()

    def _settings(self) -> dict[str, Any]:
        """The trainer settings a checkpoint records, compared on resume."""
        tc = self.cfg.trainer
        return {
            "trainer.lr": tc.lr,
            "trainer.lr_schedule": tc.lr_schedule,
            "trainer.warmup_steps": tc.warmup_steps,
            "trainer.schedule_steps": tc.schedule_steps or tc.max_steps,
            "trainer.weight_decay": tc.weight_decay,
            "trainer.adam_beta1": tc.adam_beta1,
            "trainer.adam_beta2": tc.adam_beta2,
            "global batch (trainer.batch_size x processes)": tc.batch_size
            * self.accelerator.num_processes,
            "rollout.n": self.cfg.rollout.n,
        }

    def _apply_settings(self, saved: dict[str, Any], path: Path) -> None:
        """The config wins over what the checkpoint restored, never silently: each changed
        setting is logged with its old and new value. The optimizer's lr, weight decay and betas
        are set from the config, and the lr is recomputed from the config's schedule at the
        restored step. A changed batch (or rollout.n) applies from the next step: the data
        position is an example count, so the next step reads the examples after the last one
        the checkpoint consumed."""
        now = self._settings()
        if "trainer.lr" not in saved and self.scheduler.base_lrs:  # checkpoints before settings
            saved = {**saved, "trainer.lr": self.scheduler.base_lrs[0]}
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
        for key, (old, new) in changed.items():
            log.warning(
                "resuming %s: %s changed from %s (checkpoint) to %s (config); the config's value "
                "applies from step %d",
                path,
                key,
                old,
                new,
                self.step + 1,
            )
        tc, sched = self.cfg.trainer, self.scheduler
        sched.base_lrs = [tc.lr for _ in sched.base_lrs]
        for group, fn in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = tc.lr
            group["lr"] = tc.lr * fn(sched.last_epoch)
            group["weight_decay"] = tc.weight_decay
            group["betas"] = (tc.adam_beta1, tc.adam_beta2)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def resume(self) -> None:
        """Continue from the latest complete checkpoint of this run in run_dir (none: start
        fresh). A checkpoint that fails to load (a truncated weight file, garbled JSON) is
        skipped for the previous one, with a warning naming both, and renamed
        ``corrupt-step-*``; when none loads, the error names them all.

        Every process loads the same files. The data position is a global example count, so a
        different process count resumes at the same place in the data; the same global batch
        (batch_size x processes) keeps the run identical to an uninterrupted one."""
        acc = self.accelerator
        if self.run_id is None:  # resume() called on its own, not from train()
            self.run_id = rundir.read_run_id(self.run_dir)
        ours = [
            p
            for p in ckpt.list_checkpoints(self.run_dir)
            if ckpt.checkpoint_run_id(p) in (self.run_id, None)  # None: unreadable or older
        ]
        if not ours:
            log.warning("trainer.resume: no checkpoint in %s; starting from step 0", self.run_dir)
            return
        failed: list[tuple[Path, Exception]] = []
        for path in reversed(ours):
            try:
                teacher_state = None
                if ckpt.is_sharded(path):  # FSDP2's; loads on any process count and layout
                    state = ckpt.load_sharded_checkpoint(
                        path,
                        model=unwrap(self.model),
                        optimizer=self.optimizer,
                        scheduler=self.scheduler,
                        teacher_state=self.teacher.ema or None,
                        process_index=acc.process_index,
                    )
                elif self._sharded:
                    raise RuntimeError(
                        "a checkpoint written without FSDP2 cannot be resumed under FSDP2 "
                        "(resume it without FSDP2, or start the FSDP2 run from its weights)"
                    )
                else:
                    state, teacher_state = ckpt.load_checkpoint(
                        path,
                        model=unwrap(self.model),
                        optimizer=self.optimizer,
                        scheduler=self.scheduler,
                        process_index=acc.process_index,
                    )
                break
            except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
                failed.append((path, e))
        else:
            raise RuntimeError(
                f"trainer.resume: no checkpoint in {self.run_dir} loads: "
                + "; ".join(f"{p.name}: {type(e).__name__}: {e}" for p, e in failed)
            )
        if failed:
            log.warning(
                "checkpoint %s cannot be loaded (%s: %s); resuming from the previous complete "
                "checkpoint %s instead%s",
                failed[0][0],
                type(failed[0][1]).__name__,
                str(failed[0][1])[:200],
                path,
                f" ({len(failed) - 1} more unloadable)" if len(failed) > 1 else "",
            )
            acc.wait_for_everyone()
            if acc.is_main_process:
                for bad, _ in failed:
                    ckpt.set_aside_corrupt(bad)
        if teacher_state:
            self.teacher.load_state_dict(teacher_state)
        self.step = int(state["step"])
        settings = dict(state.get("settings") or {})
        if "global_batch_size" in state:
            key = "global batch (trainer.batch_size x processes)"
            settings.setdefault(key, state["global_batch_size"])
        self._apply_settings(settings, path)
        self.stream.load_state(state["data"])
        self.counters.update(state.get("counters", {}))
        self.counters.update(self.load_counters)  # this load's skips, not the saved run's
        self._bad_in_row = int(state.get("bad_in_row", state.get("nonfinite_in_row", 0)))
        self._sync_engine()
        ahead = state.get("ahead")
        if ahead and self.prefetcher is not None:  # the batch the run generated ahead
            batch = self._draw(int(ahead["step"]))
            batch.rollouts_P_G = rollouts_from_state(ahead["rollouts"])
            if len(batch.rollouts_P_G) != len(batch.prompts):
                raise RuntimeError(
                    f"{path}: the batch generated ahead has {len(batch.rollouts_P_G)} prompts' "
                    f"rollouts, the data gives {len(batch.prompts)} prompts at this position"
                )
            self.prefetcher.put(batch)
        elif ahead:
            log.info("%s: rollout.async=false samples the batch generated ahead afresh", path)
        log.info("resumed from %s at step %d", path, self.step)


def _mean_of(outs: Sequence[DivergenceOut], name: str) -> float:
    vals = [getattr(o, name) for o in outs]
    vals = [v for v in vals if v.numel()]
    return torch.cat(vals).float().mean().item() if vals else 0.0
