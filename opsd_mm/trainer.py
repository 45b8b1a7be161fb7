"""The OPSD training loop: a plain class on accelerate, read top to bottom in ``train_step``.

sample -> pair -> teacher forward -> student forward -> loss -> backward/step -> teacher update
-> engine sync -> log -> checkpoint.

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

from opsd_mm import checkpoint as ckpt
from opsd_mm.config import RunConfig, resolve_config, save_config
from opsd_mm.data import ExampleStream
from opsd_mm.distributed import check_distributed_support
from opsd_mm.divergences import DivergenceOut, loss_mask, token_divergence
from opsd_mm.forward import completion_hidden, completion_logits, unwrap
from opsd_mm.metrics import (
    MetricsWriter,
    PhaseTimer,
    logprob_gap,
    pad_logprobs,
    repetition_rate,
    summarize_tokens,
    truncate_metrics,
)
from opsd_mm.teacher import Teacher
from opsd_mm.types import (
    Example,
    Pair,
    PairBatch,
    Processor,
    RolloutEngine,
    SamplingConfig,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``trainer.max_nonfinite_in_row`` consecutive non-finite steps."""


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


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
    ) -> None:
        from accelerate import Accelerator

        cfg = resolve_config(cfg)
        self.cfg = cfg
        tc = cfg.trainer
        mp = tc.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = accelerator or Accelerator(
            mixed_precision=mp,
            log_with=cfg.logging.report_to or None,
            project_dir=cfg.run_dir,
        )
        acc = self.accelerator
        check_distributed_support(cfg, acc)
        self.run_dir = Path(cfg.run_dir)
        self.processor = processor
        self.engine = engine
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        # The teacher is built from the initial weights, before any checkpoint is loaded.
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
        if self.teacher.frozen is not None:
            self.teacher.frozen.to(acc.device)
        self.stream = ExampleStream(
            examples,
            tc.batch_size,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        self.step = 0
        self.counters = {
            "nonfinite_steps": 0,
            "rejected_completions": 0,
            "privileged_truncated": 0,
            "bad_examples": 0,
        }
        self._nonfinite_in_row = 0
        self.timer_cuda = acc.device.type == "cuda"

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, Any]]:
        """Run until ``trainer.max_steps``; returns the logged metrics of this call."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.trainer.resume:
            self.resume()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            # Rows past the starting step came from a run that died after its last checkpoint
            # (or from an earlier run in this directory): drop them, so no step appears twice.
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
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
        try:
            while self.step < cfg.trainer.max_steps:
                metrics = self.train_step()
                history.append(metrics)
                if writer and self.step % cfg.logging.log_every == 0:
                    writer.write(metrics)
                    if cfg.logging.report_to:
                        acc.log(metrics, step=self.step)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4g}", len=f"{metrics['completion_len_mean']:.0f}"
                )
                if cfg.trainer.save_every and (
                    self.step % cfg.trainer.save_every == 0 or self.step == cfg.trainer.max_steps
                ):
                    self.save()
        finally:
            bar.close()
            if writer:
                writer.close()
            if cfg.logging.report_to:
                acc.end_training()
        return history

    def train_step(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        timer = PhaseTimer(sync_cuda=self.timer_cuda)
        t_start = time.perf_counter()

        # 1. sample: the student context only.
        examples, prompts = self._student_prompts(self.stream.next_batch())
        with timer.phase("rollout"):
            rollouts_P_G = self.engine.generate(prompts, cfg.rollout.n, self._sampling())

        # 2. pair: the teacher context, followed by the same completion ids.
        pairs: list[Pair] = []
        finish = []
        for ex, prompt, rollouts in zip(examples, prompts, rollouts_P_G):
            try:
                teacher_prompt = self.processor.teacher_prompt(ex)
            except ValueError as e:  # e.g. a teacher-only image that fails to load
                self.counters["bad_examples"] += 1
                log.warning("skipped example: %s", e)
                continue
            self.counters["privileged_truncated"] += int(
                bool(teacher_prompt.meta.get("privileged_truncated"))
            )
            for r in rollouts:
                finish.append(r.finish_reason)
                try:
                    pair = self.processor.pair(
                        ex, r.completion_ids, student=prompt, teacher=teacher_prompt
                    )
                except ValueError as e:
                    self.counters["rejected_completions"] += 1
                    log.warning("rejected completion: %s", e)
                    continue
                pair.logprobs = r.logprobs
                pairs.append(pair)

        # The step's shape over all processes, in one collective. The summed loss-token count
        # normalises every micro-batch's loss. Every process runs as many micro-batches as the
        # busiest one, since a sharded model gathers weights in each forward and DDP reduces
        # gradients in each process's last backward: a process with fewer repeats its last
        # micro-batch with weight 0. If any process has none, every process skips the step.
        skip = cfg.loss.skip_first_tokens
        n_local = sum(max(0, len(p.completion_ids) - skip) for p in pairs)
        micro = _chunks(pairs, cfg.trainer.micro_batch_size)
        shape_W2 = acc.gather(
            torch.tensor([[n_local, len(micro)]], dtype=torch.float64, device=acc.device)
        )
        n_global = shape_W2[:, 0].sum().item()
        n_micro = int(shape_W2[:, 1].max().item()) if shape_W2[:, 1].min() > 0 else 0

        # 3-5. teacher forward, student forward, loss and backward, per micro-batch.
        self.model.train()
        loss_total = torch.zeros((), device=acc.device)
        outs: list[DivergenceOut] = []
        logprobs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (engine_N, trainer_N)
        # The processor's step context (VL: each image encoded once for the whole step).
        step_ctx = getattr(self.processor, "step_context", None)
        step_scope = step_ctx(unwrap(self.model)) if step_ctx else nullcontext()
        with step_scope:
            for i in range(n_micro):
                padding = i >= len(micro)
                batch = self.processor.collate(micro[min(i, len(micro) - 1)]).to(acc.device)
                sync = i == n_micro - 1
                with acc.no_sync(self.model) if not sync else nullcontext():
                    scale = self._loss_scale(batch, n_global, n_micro)
                    loss, out = self._micro_step(batch, scale, timer)
                    if padding:
                        loss = loss * 0.0
                    with timer.phase("student"):
                        acc.backward(loss)
                if not padding:
                    loss_total += loss.detach()
                    outs.append(out)
                    if any(p.logprobs for p in micro[i]):
                        width_C = batch.completion_ids_BC.shape[1]
                        mask_BC = loss_mask(batch.completion_mask_BC, cfg.loss.skip_first_tokens)
                        engine_BC = pad_logprobs([p.logprobs for p in micro[i]], width_C)
                        logprobs.append((engine_BC[mask_BC.cpu()], out.student_logprob_N.cpu()))
        if not n_micro:  # every completion rejected (on some process): nothing to learn from
            log.warning("step %d: no usable completions", self.step + 1)

        # 6. optimizer step, unless the loss or the gradients are not finite.
        with timer.phase("optimizer"):
            loss_value = acc.reduce(loss_total, "sum").item() / acc.num_processes
            grad_norm = self._clip_grad_norm()
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                self.scheduler.step()
                self._nonfinite_in_row = 0
            else:
                self.counters["nonfinite_steps"] += 1
                self._nonfinite_in_row += 1
                log.warning("step %d: non-finite loss/grad norm; step skipped", self.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
        if self._nonfinite_in_row >= cfg.trainer.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_row} non-finite steps in a row (limit "
                f"trainer.max_nonfinite_in_row={cfg.trainer.max_nonfinite_in_row}); "
                f"last good checkpoint: {ckpt.latest_checkpoint(self.run_dir)}"
            )
        self.step += 1

        # 7-8. teacher update and engine weight sync.
        if finite:
            self.teacher.update(unwrap(self.model), self.step)
        if self.step % cfg.rollout.sync_every == 0:
            with timer.phase("sync"):
                self.engine.sync_weights(unwrap(self.model))

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
            "skipped": not finite,
            "loss_tokens": n_global,
            **summarize_tokens(div_N, "divergence"),
            "clip_fraction": _mean_of(outs, "clipped_N"),
            # mean |log p_engine - log p_trainer| on sampled tokens (vLLM; NaN with hf/fused)
            "rollout/logprob_gap": logprob_gap(
                torch.cat([e for e, _ in logprobs]) if logprobs else torch.full((1,), math.nan),
                torch.cat([t for _, t in logprobs]) if logprobs else torch.zeros(1),
            ),
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
        return metrics

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

    def _micro_step(
        self, batch: PairBatch, scale: float, timer: PhaseTimer
    ) -> tuple[torch.Tensor, DivergenceOut]:
        """Teacher forward (no grad), student forward, per-token divergence -> loss * scale."""
        cfg, acc = self.cfg, self.accelerator
        width_C = batch.completion_ids_BC.shape[1]
        mask_BC = loss_mask(batch.completion_mask_BC, cfg.loss.skip_first_tokens)
        ids_N = batch.completion_ids_BC[mask_BC]
        with acc.autocast():
            with timer.phase("teacher"), torch.no_grad():
                with self.teacher.as_teacher(unwrap(self.model)) as teacher_model:
                    if cfg.loss.fused:
                        t_hidden_BCH, t_head = completion_hidden(
                            teacher_model, batch.teacher, width_C
                        )
                        t_hidden_NH = t_hidden_BCH[mask_BC]
                        # An EMA teacher's head is swapped back out after this block: keep a copy
                        # when the EMA covers it (full fine-tuning); otherwise share it.
                        t_weight = t_head.weight
                        if self.teacher.cfg.kind == "ema" and t_weight.requires_grad:
                            t_weight = t_weight.detach().clone()
                    else:
                        t_logits_NV = completion_logits(teacher_model, batch.teacher, width_C)[
                            mask_BC
                        ]
            with timer.phase("student"):
                if cfg.loss.fused:
                    from opsd_mm.fused import fused_divergence

                    s_hidden_BCH, s_head = completion_hidden(self.model, batch.student, width_C)
                    loss, out = fused_divergence(
                        s_hidden_BCH[mask_BC],
                        t_hidden_NH,
                        s_head.weight,
                        ids_N,
                        cfg.loss,
                        bias_V=s_head.bias,
                        teacher_weight_VH=t_weight,
                        teacher_bias_V=t_head.bias,
                        scale=scale,
                        chunk_size=cfg.loss.chunk_size or None,
                        compile=cfg.loss.compile,
                    )
                else:
                    s_logits_NV = completion_logits(self.model, batch.student, width_C)[mask_BC]
                    out = token_divergence(s_logits_NV, t_logits_NV, ids_N, cfg.loss)
                    loss = out.loss_N.sum() * scale
        return loss, out

    # ------------------------------------------------------------------ helpers

    def _student_prompts(self, batch: list[Example]) -> tuple[list[Example], list[Any]]:
        """Student prompts for a batch; an example whose prompt cannot be built (a bad image
        under policy ``skip`` that slipped past data loading, an over-long question) is
        counted in ``bad_examples``, logged with its id, and left out."""
        examples, prompts = [], []
        for ex in batch:
            try:
                prompt = self.processor.student_prompt(ex)
            except ValueError as e:
                self.counters["bad_examples"] += 1
                log.warning("skipped example: %s", e)
                continue
            prompt.meta["key"] = ex.id
            examples.append(ex)
            prompts.append(prompt)
        return examples, prompts

    def _sampling(self) -> SamplingConfig:
        r = self.cfg.rollout
        return SamplingConfig(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            min_p=r.min_p,
            max_new_tokens=r.max_new_tokens,
            seed=self.cfg.seed * 1_000_003 + self.step,
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
        path = None
        if acc.is_main_process:
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                model=unwrap(self.model),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                state={
                    "data": self.stream.state(),
                    "counters": self.counters,
                    "nonfinite_in_row": self._nonfinite_in_row,
                    "num_processes": acc.num_processes,
                    "global_batch_size": self.cfg.trainer.batch_size * acc.num_processes,
                },
                teacher_state=self.teacher.state_dict() or None,
                rng_states=rng_states,
                keep_last=self.cfg.trainer.keep_last,
            )
        acc.wait_for_everyone()
        return path

    def resume(self) -> None:
        """Continue from the latest complete checkpoint in run_dir (none: start fresh).

        Every process loads the same files. The data position is a global example count, so a
        different process count resumes at the same place in the data; the same global batch
        (batch_size x processes) keeps the run identical to an uninterrupted one."""
        acc = self.accelerator
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            log.warning("trainer.resume: no checkpoint in %s; starting from step 0", self.run_dir)
            return
        state, teacher_state = ckpt.load_checkpoint(
            path,
            model=unwrap(self.model),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            process_index=acc.process_index,
        )
        saved_batch = state.get("global_batch_size")
        global_batch = self.cfg.trainer.batch_size * acc.num_processes
        if saved_batch is not None and saved_batch != global_batch:
            log.warning(
                "resuming %s with a global batch of %d (trainer.batch_size=%d x %d processes); "
                "it was saved with %d: set trainer.batch_size to keep the run's batch",
                path,
                global_batch,
                self.cfg.trainer.batch_size,
                acc.num_processes,
                saved_batch,
            )
        if teacher_state:
            self.teacher.load_state_dict(teacher_state)
        self.step = int(state["step"])
        self.stream.load_state(state["data"])
        self.counters.update(state.get("counters", {}))
        self._nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.engine.sync_weights(unwrap(self.model))
        log.info("resumed from %s at step %d", path, self.step)


def _mean_of(outs: Sequence[DivergenceOut], name: str) -> float:
    vals = [getattr(o, name) for o in outs]
    vals = [v for v in vals if v.numel()]
    return torch.cat(vals).float().mean().item() if vals else 0.0
