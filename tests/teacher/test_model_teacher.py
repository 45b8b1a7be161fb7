"""teacher.kind=model: a separate 4-layer teacher (tiny:text-teacher, tiny:qwen2.5-vl-teacher)
distils the 2-layer tiny student through the trainer.

The loss of a whole training step (routing, the teacher's own processor and collation, the
fused or naive loss, packed or padded forwards, several micro-batches) equals the loss computed
by hand from the two models' logits (single-row forwards of freshly loaded models, the JSD from
its definition in float64). Tolerance: rel 1e-5 - two different fp32 computations of the same
forwards (batched and padded or packed, against one row at a time) differ in the last bits.

The teacher copy used here has its own chat template (a system turn the student's lacks), so a
teacher prompt rendered by the student's template would give another loss. Also: the teacher is
frozen, in eval mode, outside the optimizer, unchanged by training; its per-step metrics;
same_as_student; the offload path; the config refusals.
"""

from __future__ import annotations

import math

import pytest
import torch

from opsd_mm.cli import build_trainer
from opsd_mm.config import ConfigError, load_config

from .conftest import TINY_TEXT, TINY_VL, HandReference

LOSS_RTOL = 1e-5


def _cfg(path, tiny_cache, run_dir, teacher_dir, *extra):
    return load_config(
        path,
        [
            f"run_dir={run_dir}",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
            "trainer.save_every=0",
            "teacher.kind=model",
            f"teacher.model.name_or_path={teacher_dir}",
            *extra,
        ],
    )


def _step(trainer):
    """One training step: its metrics, examples and pairs."""
    metrics = trainer.train_step()
    examples, pairs, _ = trainer._last_step
    return metrics, examples, pairs


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
def test_text_step_loss_equals_hand_reference(
    tiny_cache, tiny_text_dir, teacher_own_template, tmp_path, fused, packing
):
    cfg = _cfg(
        TINY_TEXT,
        tiny_cache,
        tmp_path,
        teacher_own_template,
        f"loss.fused={str(fused).lower()}",
        f"trainer.packing={str(packing).lower()}",
        "loss.chunk_size=7",
        "trainer.batch_size=3",
        "trainer.micro_batch_size=2",  # 6 rows: 3 micro-batches
    )
    trainer = build_trainer(cfg)
    metrics, examples, pairs = _step(trainer)
    hand = HandReference(cfg, tiny_text_dir, {"teacher": teacher_own_template})
    ref, per_teacher = hand.step_loss(examples, pairs, lambda p: "teacher")
    assert len(pairs) == 6 and metrics["loss_tokens"] == sum(len(p.completion_ids) for p in pairs)
    assert metrics["loss"] == pytest.approx(ref, rel=LOSS_RTOL)
    assert metrics["divergence_mean"] == pytest.approx(ref, rel=LOSS_RTOL)
    assert metrics["teacher/teacher/divergence_mean"] == pytest.approx(ref, rel=LOSS_RTOL)
    assert metrics["teacher/teacher/rows"] == 6
    assert metrics["teacher/teacher/loss_tokens"] == metrics["loss_tokens"]
    assert metrics["teacher/teacher/time_s"] > 0 and metrics["time/teacher"] > 0
    weights = sum(p.numel() * 4 for p in trainer.teachers.models["teacher"].model.parameters())
    assert metrics["memory/teacher_weights_gib"] == pytest.approx(weights / 2**30)
    assert metrics["memory/teacher_outputs_gib"] > 0
    # The teacher context is the teacher's own rendering (its system turn), the student's not.
    for p in pairs:
        assert "careful teacher" in p.teacher.text and "careful teacher" not in p.student.text
        ex = next(e for e in examples if e.id == p.example_id)
        assert p.teacher.input_ids == hand.teacher_procs["teacher"].teacher_prompt(ex).input_ids


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
def test_vl_step_loss_equals_hand_reference(tiny_cache, vl_teacher_own_template, tmp_path, fused):
    """tiny:qwen2.5-vl distilled from its 4-layer teacher: the images go to both models, each
    with its own image processing and its own vision tower (and vision cache)."""
    from opsd_mm.model.tiny import resolve_tiny

    cfg = _cfg(
        TINY_VL,
        tiny_cache,
        tmp_path,
        vl_teacher_own_template,
        f"loss.fused={str(fused).lower()}",
        "trainer.batch_size=2",
        "trainer.micro_batch_size=3",
    )
    trainer = build_trainer(cfg)
    metrics, examples, pairs = _step(trainer)
    student_dir = resolve_tiny("qwen2.5-vl", tiny_cache)
    hand = HandReference(cfg, student_dir, {"teacher": vl_teacher_own_template})
    ref, _ = hand.step_loss(examples, pairs, lambda p: "teacher")
    assert all(p.teacher.mm_inputs and p.student.mm_inputs for p in pairs)
    assert metrics["loss"] == pytest.approx(ref, rel=LOSS_RTOL)
    assert all("careful teacher" in p.teacher.text for p in pairs)
    # Each model has its own vision cache for the step: the teacher's tower is wrapped too.
    from opsd_mm.processors.vision_cache import find_vision_tower

    tower = find_vision_tower(trainer.teachers.models["teacher"].model)
    with trainer.teachers.step_context():
        assert "forward" in tower.__dict__
    assert "forward" not in tower.__dict__


def test_teacher_is_frozen_outside_the_optimizer(
    tiny_cache, tiny_text_dir, tiny_teacher_dir, tmp_path
):
    cfg = _cfg(TINY_TEXT, tiny_cache, tmp_path, "tiny:text-teacher", "trainer.lr=0.05")
    trainer = build_trainer(cfg)
    teacher = trainer.teachers.models["teacher"].model
    student_params = {id(p) for p in trainer.model.parameters()}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    params = list(teacher.parameters())
    assert len(params) > 0 and not any(p.requires_grad for p in params)
    assert not {id(p) for p in params} & (in_optimizer | student_params)
    assert not teacher.training
    assert teacher.config.num_hidden_layers == 4 and trainer.model.config.num_hidden_layers == 2
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    lora_before = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n
    }
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())
    assert not teacher.training
    moved = [n for n, p in trainer.model.named_parameters() if n in lora_before]
    assert any(
        not torch.equal(lora_before[n], dict(trainer.model.named_parameters())[n]) for n in moved
    )


def test_offload_gives_the_same_step(tiny_cache, tiny_text_dir, tiny_teacher_dir, tmp_path):
    """teacher.model.offload=true: the weights stay in CPU memory between forwards (on a CPU
    the move is a no-op, so the same computation repeats and the losses are bit-identical; a GPU
    check is in tests/teacher/test_model_teacher_gpu.py)."""
    losses = {}
    for offload in (False, True):
        cfg = _cfg(
            TINY_TEXT,
            tiny_cache,
            tmp_path / str(offload),
            "tiny:text-teacher",
            f"teacher.model.offload={str(offload).lower()}",
        )
        trainer = build_trainer(cfg)
        losses[offload] = [trainer.train_step()["loss"] for _ in range(2)]
        assert next(trainer.teachers.models["teacher"].model.parameters()).device.type == "cpu"
    assert losses[True] == losses[False]


def test_same_as_student_is_the_student_context(tiny_cache, tiny_text_dir, tmp_path):
    """processor.teacher_template=same_as_student: the teacher prompt is the student prompt,
    ids and text (self teacher), or the teacher's own rendering of the student template."""
    from opsd_mm.config import ProcessorConfig
    from opsd_mm.data.tasks import make_arithmetic_examples
    from opsd_mm.model.load import model_type_of
    from opsd_mm.processors import build_processor

    same = ProcessorConfig(teacher_template="same_as_student")
    proc = build_processor(same, str(tiny_text_dir), model_type_of(tiny_text_dir))
    for ex in make_arithmetic_examples(4, seed=3):
        s, t = proc.student_prompt(ex), proc.teacher_prompt(ex)
        assert t.input_ids == s.input_ids and t.text == s.text
        assert ex.privileged and ex.privileged not in t.text
    # Through the trainer with the teacher's own template: the student template's message, in
    # the teacher's chat template, without the privileged text.
    cfg = load_config(
        TINY_TEXT,
        [
            f"run_dir={tmp_path}",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
            "teacher.kind=fixed",
            "processor.teacher_template=same_as_student",
        ],
    )
    trainer = build_trainer(cfg)
    _, _, pairs = _step(trainer)
    assert pairs and all(p.teacher.input_ids == p.student.input_ids for p in pairs)


def test_vl_same_as_student_has_no_teacher_images(tiny_cache):
    from opsd_mm.config import ProcessorConfig
    from opsd_mm.data.vl_tasks import draw_grid
    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors import build_processor
    from opsd_mm.types import Example

    path = resolve_tiny("qwen2.5-vl", tiny_cache)
    proc = build_processor(
        ProcessorConfig(teacher_template="same_as_student"), str(path), "qwen2_5_vl"
    )
    ex = Example(
        id="e",
        question="<image>\nHow many red cells?",
        privileged="Two.",
        images=(draw_grid({(0, 0): "red"}, 2, 2, 28),),
        teacher_images=(draw_grid({(1, 1): "red"}, 2, 2, 28),),
    )
    s, t = proc.student_prompt(ex), proc.teacher_prompt(ex)
    assert t.input_ids == s.input_ids and len(t.images) == 1
    assert torch.equal(t.mm_inputs["pixel_values"], s.mm_inputs["pixel_values"])


def test_plain_grpo_never_loads_the_teacher(tiny_cache, tmp_path, tiny_teacher_dir):
    """loss.distill_weight=0: the model teacher is neither loaded nor run (its weights could be
    anywhere: here the path has none), and the run trains on the reward alone."""
    import shutil

    empty = tmp_path / "no-weights"
    shutil.copytree(tiny_teacher_dir, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = _cfg(
        TINY_TEXT,
        tiny_cache,
        tmp_path / "run",
        empty,
        "loss.distill_weight=0",
        "loss.reward_weight=1",
    )
    trainer = build_trainer(cfg)
    assert trainer.teachers.models == {}
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and "time/teacher" not in metrics


# ----------------------------------------------------------------------------- config refusals

MODEL = ["teacher.kind=model", "teacher.model.name_or_path=tiny:text-teacher"]
SERVED = [*MODEL, "teacher.scoring=server", "teacher.server_url=http://127.0.0.1:1"]


def test_model_teacher_configs_accepted():
    cfg = load_config(TINY_TEXT, MODEL)
    assert cfg.teacher.kind == "model"
    load_config(TINY_TEXT, [*SERVED, "loss.divergence=sampled_pg", "loss.temperature=1.0"])
    load_config(TINY_TEXT, [*SERVED, "loss.top_k=8", "loss.temperature=1.0"])
    # A served model teacher does not need the generation server.
    assert (
        load_config(TINY_TEXT, [*SERVED, "loss.top_k=8", "loss.temperature=1.0"]).rollout.engine
        == "hf"
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["teacher.kind=model"], r"^teacher.model.name_or_path must be set with teacher.kind=model"),
        ([*MODEL, "teacher.server_url=http://x"], r"^teacher.server_url=http://x applies to"),
        ([*MODEL, "teacher.scoring=server", "loss.top_k=8", "loss.temperature=1.0"],
         r"^teacher.server_url=None: must be set"),
        ([*SERVED, "loss.temperature=1.0"], r"^loss.divergence=jsd: teacher.scoring=server needs"),
        ([*SERVED, "loss.top_k=8", "loss.temperature=0.5"], r"^loss.temperature=0.5: teacher"),
        ([*SERVED, "loss.top_k=8", "loss.temperature=1.0", "rollout.server_url=http://127.0.0.1:1"],
         r"^teacher.server_url=http://127.0.0.1:1: is the generation server"),
        (["teacher.model.name_or_path=tiny:text-teacher"],
         r"^teacher.model.name_or_path=tiny:text-teacher applies to teacher.kind=model"),
        (["teacher.server_url=http://x"], r"^teacher.server_url=http://x applies to teacher.kind"),
        (["teacher.route_by=source"], r"^teacher.route_by=source routes examples"),
        (["teacher.route_default=big"], r"^teacher.route_default=big routes examples"),
    ],
)  # fmt: skip
def test_model_teacher_config_refusals(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY_TEXT, overrides)


def test_offload_is_refused_under_fsdp2():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from opsd_mm.train.distributed import check_distributed_support

    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, num_processes=2)
    ddp = SimpleNamespace(
        distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False, num_processes=2
    )
    cfg = load_config(TINY_TEXT, [*MODEL, "teacher.model.offload=true"])
    check_distributed_support(cfg, ddp)
    check_distributed_support(load_config(TINY_TEXT, MODEL), fsdp2)
    with pytest.raises(ConfigError, match=r"^teacher.model.offload=true .*FSDP2"):
        check_distributed_support(cfg, fsdp2)
