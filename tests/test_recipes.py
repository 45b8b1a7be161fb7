"""The reference recipes hold the OPSD reference's values, key by key.

Each table below lists what one launch script of the reference repository (siyan-zhao/OPSD)
sets, either by a flag or through the defaults of the classes it parses them into (TRL's
GOLDConfig, transformers' TrainingArguments, TRL's ModelConfig), as the value of our config key
that carries it. docs/reproduce.md has the same mapping with the flag names, and what still
differs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from opsd_mm.config import RunConfig, load_config
from opsd_mm.processors.templates import get_template

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Rows of the train split of siyanzhao/Openthoughts_math_30k_opsd, the set every script trains on.
ROWS = 29_434


def hf_trainer_steps(
    rows: int, per_device: int, processes: int, grad_accum: int, epochs: int
) -> int:
    """Optimizer steps of ``epochs`` epochs in the transformers Trainer (4.57, the reference's).

    The DataLoader keeps the last partial batch; accelerate shards the batches over the
    processes, padding to an even count (``BatchSamplerShard`` with ``even_batches``); the
    Trainer counts a trailing partial accumulation as a step and rounds epochs x steps up.
    """
    batches = math.ceil(rows / per_device)
    per_process = math.ceil(batches / processes)
    per_epoch = max(per_process // grad_accum + int(per_process % grad_accum > 0), 1)
    return math.ceil(epochs * per_epoch)


def test_hf_trainer_steps_by_hand():
    # 10 rows in batches of 2 -> 5 batches; 2 processes -> 3 each (one padded); accumulation 2
    # -> 2 steps an epoch (the second a single micro-batch); 3 epochs -> 6.
    assert hf_trainer_steps(10, 2, 2, 2, 3) == 6
    # 29,434 rows, 2 a batch, 8 processes, accumulation 2: 14,717 -> 1,840 -> 920 an epoch.
    assert hf_trainer_steps(ROWS, 2, 8, 2, 1) == 920


@dataclass(frozen=True)
class Script:
    """One reference launch script: its parallel layout and the values it pins."""

    config: str
    script: str
    processes: int
    per_device: int
    grad_accum: int
    epochs: int
    expected: dict[str, Any] = field(default_factory=dict)


# What the release's scripts share (siyan-zhao/OPSD at its release, scripts/run_opsd*.sh):
# flags, then the defaults they leave to TRL / transformers.
RELEASE_COMMON: dict[str, Any] = {
    "model.dtype": "bfloat16",  # --torch_dtype bfloat16
    "model.lora.enabled": True,  # --use_peft
    "model.lora.r": 64,  # --lora_r 64
    "model.lora.alpha": 128,  # --lora_alpha 128
    "model.lora.dropout": 0.0,  # ModelConfig 0.05, zeroed by GOLDConfig.disable_dropout=True
    "data.source": "siyanzhao/Openthoughts_math_30k_opsd",  # opsd_train.py
    "data.split": "train",
    "data.preset": "opsd_math",  # columns problem / solution (data_collator.py)
    "processor.student_template": "opsd_student_v1",  # data_collator.py
    "processor.teacher_template": "opsd_teacher_v0",  # data_collator.py (release wording)
    # The student prompt is decoded with skip_special_tokens before vLLM generation
    # (opsd_trainer.py); the teacher's keeps the chat template; enable_thinking not passed.
    "processor.student_prompt_format": "specials_stripped",
    "processor.student_thinking": True,
    "processor.teacher_thinking": True,
    "processor.max_teacher_prompt_tokens": 20_000,  # --max_length 20000
    "rollout.engine": "vllm",  # --use_vllm --vllm_mode colocate
    "rollout.n": 1,  # one completion per prompt
    "rollout.temperature": 1.1,  # --temperature 1.1
    "rollout.top_p": 0.95,  # --top_p 0.95
    "rollout.top_k": 20,  # --top_k 20
    "rollout.min_p": 0.0,  # not set: 0.0 in opsd_trainer.py
    "rollout.sync_every": 1,  # GOLDConfig.vllm_sync_frequency
    "rollout.gpu_memory_utilization": 0.6,  # --vllm_gpu_memory_utilization 0.6
    "loss.divergence": "jsd",  # generalized_jsd_loss
    "loss.beta": 0.5,  # --beta 0.5
    "loss.pointwise_clip": None,  # no clip in the release
    "loss.token_clip": None,
    "loss.skip_first_tokens": 0,
    "loss.temperature": 1.1,  # the loss divides by the same --temperature
    "loss.normalize": "micro_batch_mean",  # batchmean per micro-batch / accumulation steps
    "trainer.lr": 2e-4,  # --learning_rate 2e-4
    "trainer.weight_decay": 0.0,  # TrainingArguments defaults from here on
    "trainer.adam_beta1": 0.9,
    "trainer.adam_beta2": 0.999,
    "trainer.warmup_steps": 0,
    "trainer.lr_schedule": "linear",
    "trainer.max_grad_norm": 1.0,
    "trainer.mixed_precision": "bf16",  # GOLDConfig.bf16
    "trainer.gradient_checkpointing": True,  # --gradient_checkpointing
    "trainer.save_every": 50,  # --save_steps 50
    "trainer.keep_last": 0,  # save_total_limit unset: keep every checkpoint
    "logging.log_every": 2,  # --logging_steps 2
    "seed": 42,
}

RELEASE_4B: dict[str, Any] = {
    **RELEASE_COMMON,
    "model.name_or_path": "Qwen/Qwen3-4B",
    "processor.max_prompt_tokens": 20_000 - 1024,  # --max_length - --max_completion_length
    "rollout.max_new_tokens": 1024,  # --max_completion_length 1024
    "trainer.micro_batch_size": 1,  # --per_device_train_batch_size 1
    "trainer.batch_size": 4,  # x --gradient_accumulation_steps 4
}

SCRIPTS = (
    Script(
        "opsd_qwen3_1.7b_paper.yaml",
        "scripts/run_opsd_1b.sh (release)",
        processes=8,
        per_device=2,
        grad_accum=2,
        epochs=30,
        expected={
            **RELEASE_COMMON,
            "model.name_or_path": "Qwen/Qwen3-1.7B",
            "processor.max_prompt_tokens": 20_000 - 2048,
            "rollout.max_new_tokens": 2048,  # --max_completion_length 2048
            "loss.top_k": 0,
            "teacher.kind": "fixed",  # --fixed_teacher
            "trainer.micro_batch_size": 2,  # --per_device_train_batch_size 2
            "trainer.batch_size": 4,  # x --gradient_accumulation_steps 2
            "trainer.max_steps": 500,  # the last checkpoint the release README evaluates
            "trainer.schedule_steps": 27_600,
        },
    ),
    Script(
        "opsd_qwen3_4b_paper.yaml",
        "scripts/run_opsd.sh (release)",
        processes=8,
        per_device=1,
        grad_accum=4,
        epochs=30,
        expected={
            **RELEASE_4B,
            "loss.top_k": 0,
            "teacher.kind": "fixed",
            "trainer.max_steps": 27_600,
            "trainer.schedule_steps": 27_600,
        },
    ),
    Script(
        "opsd_qwen3_4b_ema_paper.yaml",
        "scripts/run_opsd_ema.sh (release)",
        processes=2,
        per_device=1,
        grad_accum=4,
        epochs=30,
        expected={
            **RELEASE_4B,
            "loss.top_k": 0,
            "teacher.kind": "ema",  # --use_ema_teacher (no --fixed_teacher)
            "teacher.ema_decay": 0.999,  # --ema_decay 0.999
            "teacher.ema_update_every": 1,  # after every optimizer step
            "trainer.max_steps": 110_400,
            "trainer.schedule_steps": 110_400,
        },
    ),
    Script(
        "opsd_qwen3_4b_topk50_paper.yaml",
        "scripts/run_opsd_topkloss.sh (release)",
        processes=2,
        per_device=1,
        grad_accum=4,
        epochs=30,
        expected={
            **RELEASE_4B,
            "loss.top_k": 50,  # --top_k_loss 50
            "loss.top_k_tail_bucket": False,  # both renormalised over the teacher's top 50
            "teacher.kind": "fixed",
            "trainer.max_steps": 110_400,
            "trainer.schedule_steps": 110_400,
        },
    ),
    Script(
        "opsd_qwen3_1.7b_v2.yaml",
        "scripts/run_opsd_1b.sh (revision of 2026-03-18 on)",
        processes=4,
        per_device=4,
        grad_accum=2,
        epochs=30,
        expected={
            **RELEASE_COMMON,
            "model.name_or_path": "Qwen/Qwen3-1.7B",
            "processor.teacher_template": "opsd_teacher_v1",  # the revised data_collator.py
            "processor.student_prompt_format": "chat_template",  # specials kept for vLLM
            "processor.student_thinking": False,  # opsd_train.py default student_thinking
            "processor.teacher_thinking": True,  # opsd_train.py default teacher_thinking
            "processor.allow_thinking_mismatch": True,
            "processor.max_prompt_tokens": 20_000 - 1024,
            "rollout.max_new_tokens": 1024,  # --max_completion_length 1024
            "loss.beta": 0.0,  # --beta 0: forward KL
            "loss.pointwise_clip": 0.05,  # --jsd_token_clip 0.05 (point-wise clamp)
            "loss.top_k": 0,
            "teacher.kind": "fixed",
            "trainer.lr": 5e-6,  # --learning_rate 5e-6
            "trainer.max_grad_norm": 0.1,  # --max_grad_norm 0.1
            "trainer.micro_batch_size": 4,  # --per_device_train_batch_size 4
            "trainer.batch_size": 8,  # x --gradient_accumulation_steps 2
            "trainer.save_every": 25,  # --save_steps 25
            "trainer.max_steps": 100,  # the last checkpoint the revised README evaluates
            "trainer.schedule_steps": 27_600,
        },
    ),
)


def value_at(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture(params=SCRIPTS, ids=lambda s: s.config)
def script(request) -> Script:
    return request.param


def test_recipe_holds_the_reference_values(script):
    cfg = load_config(CONFIGS / script.config)
    wrong = {
        key: (value_at(cfg, key), expected)
        for key, expected in script.expected.items()
        if value_at(cfg, key) != expected or type(value_at(cfg, key)) is not type(expected)
    }
    assert not wrong, f"{script.config} vs {script.script}: {{key: (ours, reference)}} {wrong}"


def test_batch_layout(script):
    """Per process: micro-batches of per_device sequences, grad_accum of them per step."""
    tc = load_config(CONFIGS / script.config).trainer
    assert tc.micro_batch_size == script.per_device
    assert tc.batch_size == script.per_device * script.grad_accum
    header = (CONFIGS / script.config).read_text().split("\nmodel:", 1)[0]
    assert f"--num_processes {script.processes} " in header, "launch line: wrong process count"


def test_schedule_horizon_is_the_scripts_epochs(script):
    tc = load_config(CONFIGS / script.config).trainer
    expected = hf_trainer_steps(
        ROWS, script.per_device, script.processes, script.grad_accum, script.epochs
    )
    assert tc.schedule_steps == expected
    assert tc.max_steps <= tc.schedule_steps


def test_templates_and_lora_targets(script):
    cfg = load_config(CONFIGS / script.config)
    get_template(cfg.processor.student_template, "student")
    get_template(cfg.processor.teacher_template, "teacher")
    # --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    regex = re.compile(cfg.model.lora.target_regex)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        part = "self_attn" if name[0] in "qkvo" else "mlp"
        assert regex.match(f"model.layers.11.{part}.{name}"), name
    for other in ("lm_head", "model.embed_tokens", "model.layers.0.input_layernorm"):
        assert not regex.match(other), other


def test_release_teacher_wording():
    """siyan-zhao/OPSD data_collator.py at its release, written out independently:
    f"{problem}\\n\\nHere is a reference solution to this problem:\\n{solution}\\n"
    f"{transition_prompt}\\n" + the boxed instruction, the transition starting with two newlines
    and ending with one."""
    assert get_template("opsd_teacher_v0", "teacher").render("Q?", "S.") == (
        "Q?\n\nHere is a reference solution to this problem:\nS.\n\n\n"
        "After understanding the reference solution and the rationale behind each step, now "
        "articulate your own step-by-step reasoning that derives the same final answer to the "
        "problem below:\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
