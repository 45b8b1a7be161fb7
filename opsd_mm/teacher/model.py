"""A separate checkpoint as the teacher (``teacher.kind=model``, a model entry of ``teachers``).

Distillation from another model - usually a larger one of the student's family - through the
same trainer as self-distillation: the teacher scores the student's exact completion ids after
its own rendering of the teacher context (the privileged one, or with
``processor.teacher_template=same_as_student`` the student's), so its chat template, thinking
mode and image processing are its own (``processor``, built from its checkpoint). Its
vocabulary was checked against the student's before any weights loaded
(``opsd_mm.teacher.vocab``).

The model is frozen: no parameter requires grad, it runs in eval mode under ``torch.no_grad``
(the loss's), and it is never handed to the optimizer or wrapped for DDP (nothing of it is
reduced). Where it lives:

- on the device, in its own dtype (``teacher.model.dtype``: bf16 on CUDA by default);
- ``teacher.model.offload``: in CPU memory, moved to the device for each forward and back after
  it, so between micro-batches the device holds the student alone;
- under FSDP2: sharded like the student (accelerate's ``fsdp2_prepare_model``, one unit per
  decoder layer), so each process holds 1/W of it; every process then runs each of its forwards
  (``opsd_mm.train.batches`` groups micro-batches by teacher and pads every process to the same
  count; ``opsd_mm.teacher.forward.PaddingForward``);
- scored on a server (``scoring=server``): no weights here at all; a
  :class:`~opsd_mm.rollout.client.ServerEngine` pointed at the teacher's own ``opsd-mm serve``
  is used for ``score`` only (never for generation or weight sync).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from opsd_mm.config import ModelConfig, RunConfig, TeacherSpec
from opsd_mm.model.forward import completion_hidden, completion_logits
from opsd_mm.model.packing import packable
from opsd_mm.rollout.base import ScoringEngine
from opsd_mm.teacher.forward import TeacherOutputs, cut_rows
from opsd_mm.teacher.scoring import score_pairs
from opsd_mm.teacher.vocab import VocabInfo
from opsd_mm.teacher.weights import _reshard
from opsd_mm.types import Pair, PairBatch, Processor

log = logging.getLogger(__name__)


def model_config(spec: TeacherSpec, cfg: RunConfig) -> ModelConfig:
    """The teacher's checkpoint settings as a :class:`ModelConfig` (what ``load_model`` and
    ``resolve_model_path`` take; tiny teachers build in the student's tiny cache)."""
    m = spec.model
    return ModelConfig(
        name_or_path=m.name_or_path or "",
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        tiny_cache_dir=cfg.model.tiny_cache_dir,
    )


def load_teacher_weights(path: str, spec: TeacherSpec, cfg: RunConfig, device: Any) -> Any:
    """The frozen teacher: its weights (on ``device``, or on the CPU with ``offload``), its
    LoRA adapter merged when given, every parameter ``requires_grad=False``, eval mode."""
    from opsd_mm.model.load import load_model

    where = "cpu" if spec.model.offload else device
    model = load_model(path, model_config(spec, cfg), where)
    if spec.model.adapter:
        from pathlib import Path

        from peft import PeftModel

        if not (Path(spec.model.adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"teacher.model.adapter: no adapter_config.json in {spec.model.adapter}"
            )
        model = PeftModel.from_pretrained(model, spec.model.adapter).merge_and_unload()
    model.requires_grad_(False)
    return model.eval()


def _whole(param: torch.Tensor | None, share: bool) -> torch.Tensor | None:
    """A head parameter as the loss may use it after the forward: a sharded (FSDP2) one gathered
    whole (collective); else shared, or copied where it will not stay as it is (``share``
    false: a gathered FSDP2 unit is freed by resharding, an offloaded one moves to the CPU)."""
    if param is None:
        return None
    if hasattr(param, "full_tensor"):
        return param.full_tensor()
    return param.detach() if share else param.detach().clone()


class ModelTeacher:
    """One separate teacher: its name, its own processor, and its frozen model (local) or the
    client of its server (``scoring=server``)."""

    def __init__(
        self,
        name: str,
        spec: TeacherSpec,
        processor: Processor,
        vocab: VocabInfo,
        model: torch.nn.Module | None = None,
        engine: ScoringEngine | None = None,
    ) -> None:
        if (model is None) == (engine is None):
            raise ValueError(f"teacher '{name}': give its model (local) or its engine (server)")
        self.name = name
        self.spec = spec
        self.processor = processor
        self.vocab = vocab
        self.model = model
        self.engine = engine
        self.device: torch.device | None = None
        self.sharded = False
        self.vl = model is not None and getattr(model.config, "vision_config", None) is not None
        why_not = packable(model) if model is not None else "scored on a server"
        self.packable = why_not is None

    @property
    def on_server(self) -> bool:
        return self.engine is not None

    def prepare(self, accelerator: Any) -> None:
        """Place the model for the run: sharded under FSDP2, else on the device (kept in CPU
        memory with ``offload``). Called by the trainer once the student is prepared."""
        if self.model is None:
            return
        self.device = accelerator.device
        if getattr(accelerator, "is_fsdp2", False):
            from accelerate.utils import fsdp2_prepare_model

            self.model = fsdp2_prepare_model(accelerator, self.model)
            self.sharded = True
        elif not self.spec.model.offload:
            self.model.to(self.device)

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[torch.nn.Module]:
        """The model on the device for one forward (``offload``: moved there and back)."""
        model = self.model
        offload = self.spec.model.offload and not self.sharded
        if offload:
            model.to(self.device)
        try:
            yield model
        finally:
            if offload:
                model.to("cpu")

    def completion_outputs(
        self,
        batch: PairBatch,
        student: torch.nn.Module,
        fused: bool,
        packed: bool,
        mask_BC: torch.Tensor,
    ) -> TeacherOutputs:
        """The teacher at the loss tokens (``opsd_mm.teacher.forward.TeacherForward``), from
        ``batch.teacher`` (this teacher's own rendering); padded rows where its architecture has
        no padding-free forward. Cut to the student's vocabulary rows."""
        width_C = batch.completion_ids_BC.shape[1]
        packed = packed and self.packable
        # The head may be shared with the loss only where it stays as it is after the forward.
        share = not self.sharded and not self.spec.model.offload
        with self._on_device() as model:
            if fused:
                hidden_NH, head = completion_hidden(model, batch.teacher, width_C, mask_BC, packed)
                out = TeacherOutputs(
                    hidden_NH, _whole(head.weight, share), _whole(head.bias, share)
                )
            else:
                logits = completion_logits(model, batch.teacher, width_C, mask_BC, packed)
                out = TeacherOutputs(logits_NV=logits)
        if self.sharded:  # free what the forward gathered (the root keeps its units otherwise)
            _reshard(model)
        return cut_rows(out, self.vocab.student_rows)

    def score(self, pairs: Sequence[Pair], top_k: int) -> None:
        """``scoring=server``: every pair's completion scored after this teacher's prompt on its
        server (``opsd_mm.teacher.scoring.score_pairs``), the result on ``pair.teacher_scores``.
        A top-k id past the student's vocabulary rows (a padding row of a larger embedding)
        cannot be compared: an error naming the example."""
        score_pairs(self.engine, pairs, top_k)
        rows = self.vocab.student_rows
        for p in pairs:
            ids = p.teacher_scores.topk_ids if p.teacher_scores else None
            if ids and max(max(r) for r in ids) >= rows:
                raise RuntimeError(
                    f"example '{p.example_id}': teacher '{self.name}' ranks an id past the "
                    f"student's {rows} vocabulary rows among its top {top_k}; score it locally"
                )

    def step_context(self) -> contextlib.AbstractContextManager:
        """The teacher processor's step context on the teacher's own model (VL: its own vision
        cache, so each image is encoded once per step by the teacher's tower too)."""
        if self.model is None:
            return contextlib.nullcontext()
        return self.processor.step_context(self.model)

    def weight_bytes(self) -> int:
        """Bytes of the teacher's weights this process holds on the run's device (its shard
        under FSDP2; none while offloaded to the CPU, unless the device is the CPU)."""
        if self.model is None:
            return 0
        total = 0
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if self.device is None or local.device.type == self.device.type:
                total += local.numel() * local.element_size()
        return total
