"""The run configuration's sections: frozen dataclasses, one per YAML section.

Each field's comment (the ``#`` lines right above it) is its documentation: ``opsd-mm config
reference`` turns them into docs/config.md, so write them for a user. Loading (YAML, overrides,
saving) is in ``opsd_mm.config.load``; checks (resolve, validate) in ``opsd_mm.config.checks``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from opsd_mm.errors import ConfigError


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Regex over module names: the language model's projections only (for VL models this
    # leaves the vision tower alone; a plain name list would also wrap Qwen2.5-VL's vision MLP).
    target_regex: str = (
        r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    )


@dataclass(frozen=True)
class ModelConfig:
    # A hub id, a local directory, or ``tiny:<name>`` for a tiny offline model built on first use.
    name_or_path: str = "tiny:text"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # VL only: what besides the language model trains.
    train_projector: bool = False
    train_vision_tower: bool = False
    # Where ``tiny:`` models are built (default: ~/.cache/opsd-mm/tiny).
    tiny_cache_dir: str | None = None


@dataclass(frozen=True)
class ColumnsConfig:
    """Which dataset column feeds each Example field (None: not present)."""

    id: str | None = None
    question: str = "problem"
    privileged: str | None = "solution"
    answer: str | None = None
    images: str | None = None
    teacher_images: str | None = None


@dataclass(frozen=True)
class DataConfig:
    # A hub dataset id, a local .json/.jsonl/.parquet file, a ``save_to_disk`` directory,
    # or ``synthetic:<task>`` (generated in-process; see opsd_mm.data.tasks).
    source: str = "synthetic:arithmetic"
    # null: the preset's split (We-Math 2.0 ships ``standard`` / ``pro``), else ``train``.
    split: str | None = None
    subset: str | None = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # A known dataset (opsd_mm.data.presets): its row mapping, split and teacher template.
    preset: str | None = None
    # Base directory for relative image paths (null: the directory of data.source).
    data_dir: str | None = None
    bad_row_policy: Literal["skip", "raise"] = "skip"
    # null: rows must hold what the teacher template shows ({privileged} and/or {answer});
    # true/false force or waive the privileged-text requirement.
    require_privileged: bool | None = None
    limit: int | None = None
    shuffle: bool = True
    synthetic_size: int = 256
    # Drop training rows whose question (n-gram overlap) or image (perceptual hash) matches an
    # item of these benchmarks, loaded from contamination_data_dir (save_to_disk copies named
    # after the benchmarks, as for ``opsd-mm eval --data-dir``) or from the hub.
    exclude_contaminated: bool = False
    contamination_benchmarks: list[str] = field(
        default_factory=lambda: [
            "mmmu", "mathvision", "mathvista", "wemath", "zerobench",
            "math500", "aime24", "aime25", "hmmt25",
        ]
    )  # fmt: skip
    contamination_data_dir: str | None = None


@dataclass(frozen=True)
class ProcessorConfig:
    kind: Literal["auto", "text", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "auto"
    student_template: str = "opsd_student_v1"
    teacher_template: str = "opsd_teacher_v1"
    # Thinking mode per role (the chat template's ``enable_thinking``). A difference between
    # the two is a config error unless allow_thinking_mismatch=true: the teacher would score the
    # student's completion after a different generation prompt (e.g. an empty closed think block
    # on one side only).
    student_thinking: bool = False
    teacher_thinking: bool = False
    allow_thinking_mismatch: bool = False
    # How the student prompt is tokenised. ``chat_template``: the ids of one chat-template
    # application. ``specials_stripped``: the OPSD reference's documented quirk (its reported
    # results): the chat-template text with every special token removed, then tokenised as plain
    # text, so the student sees ``user\n...\nassistant\n`` without <|im_start|>/<|im_end|>.
    student_prompt_format: Literal["chat_template", "specials_stripped"] = "chat_template"
    max_prompt_tokens: int = 1024
    # Teacher prompt budget: the privileged text is truncated (and counted) to fit it.
    max_teacher_prompt_tokens: int = 4096
    # VL image sizing (qwen_vl_utils semantics) and bad-image policy.
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_image_pixels: int = 50_000_000
    bad_image_policy: Literal["skip", "raise"] = "skip"
    # Encode each image once per step and share it between the teacher and student forwards
    # (only while the vision tower is frozen; numerically identical to re-encoding).
    reuse_vision: bool = True
    # Keep up to this many rendered prompts per side (student, teacher) across epochs, so a
    # multi-epoch run tokenises and image-processes each example once (opsd_mm/train/prompt_cache.py;
    # identical prompts). 0: render every time. Memory: the prompts' ids and pixel tensors.
    prompt_cache: int = 0


@dataclass(frozen=True)
class RolloutConfig:
    # hf: transformers generate; vllm: colocated vLLM; vllm_server: an ``opsd-mm serve`` process.
    engine: Literal["hf", "vllm", "vllm_server"] = "hf"
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    # Re-sync engine weights every this many optimizer steps (vllm).
    sync_every: int = 1
    gpu_memory_utilization: float = 0.3
    vllm_sleep_mode: bool = False
    # vllm_server: the server's base URL (http://127.0.0.1:8765), its bearer token (null: the
    # OPSD_MM_SERVER_TOKEN environment variable, which keeps it out of the run's config.yaml),
    # the per-request timeout, and the retries of a failed request (timeouts, a restarting
    # server) before the run stops.
    server_url: str | None = None
    server_token: str | None = None
    server_timeout_s: float = 600.0
    server_retries: int = 3
    # Where the trainer writes the safetensors the server reloads (a path both can read;
    # null: RUN_DIR/engine_weights).
    server_sync_dir: str | None = None
    # How synced weights reach the server: file (safetensors in server_sync_dir, reloaded), or
    # broadcast over a two-process group the trainer hosts: gloo (TCP, any device, any machine)
    # or nccl (GPU to GPU). Group: the address the server reaches the trainer at, and its port
    # (0: a free one). See opsd_mm.rollout.client.
    server_transport: Literal["file", "gloo", "nccl"] = "file"
    server_group_host: str = "127.0.0.1"
    server_group_port: int = 0
    # Generate the next step's rollouts while this step trains (one step off-policy: a batch
    # comes from the weights one optimizer step behind the ones it trains; see
    # opsd_mm.rollout.prefetch). vllm_server only, one trainer process. Spelled ``async`` in YAML
    # and overrides (rollout.async=true): ``async`` is a Python keyword.
    async_: bool = False


@dataclass(frozen=True)
class LossConfig:
    # jsd (generalized, beta), forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher),
    # sampled_pg = sampled-token reverse-KL policy gradient.
    divergence: Literal["jsd", "forward_kl", "reverse_kl", "sampled_pg"] = "jsd"
    beta: float = 0.5
    # Teacher top-k support (0: full vocabulary); tail bucket keeps the remaining mass as one bin.
    top_k: int = 0
    top_k_tail_bucket: bool = False
    # Point-wise clip of each vocabulary term of the divergence (OPSD v3 uses 0.05); per-token clip.
    pointwise_clip: float | None = None
    token_clip: float | None = None
    skip_first_tokens: int = 0
    # Softmax temperature of both distributions in the loss. null: the sampling temperature
    # (rollout.temperature), as the OPSD reference ties them; resolved at load, so the run's
    # config.yaml shows the number used.
    temperature: float | None = None
    # ``step_tokens``: sum of per-token losses / the step's global loss-token count (every token
    # weighs the same). ``micro_batch_mean``: the mean over micro-batches (and processes) of each
    # micro-batch's token mean, as a transformers-Trainer-based reference (OPSD, TRL) reduces.
    normalize: Literal["step_tokens", "micro_batch_mean"] = "step_tokens"
    # Fused chunked path from hidden states (never materialises tokens x vocab); false: the
    # naive reference on materialised logits.
    fused: bool = True
    # Tokens per chunk of the fused path (0: derived from a memory budget).
    chunk_size: int = 0
    # torch.compile each chunk's loss computation in the fused path (fuses its elementwise
    # passes into few kernels; costs a compile on the first step).
    compile: bool = False
    # Truncated importance weight min(p_trainer(y) / p_rollout(y), c) per sampled token,
    # detached, multiplying the per-token loss (engine/trainer mismatch, stale weights); null:
    # off. See opsd_mm.loss.importance.
    importance_clip: float | None = None
    # Verifiable reward beside the teacher (docs/rewards.md): loss = distill_weight * the
    # distillation term + reward_weight * the policy-gradient term -A * log p_s(y) on the sampled
    # tokens, A the GRPO group-normalised advantage over the rollout.n samples of each prompt.
    # reward_weight=0: pure OPSD (no reward is computed); distill_weight=0: plain GRPO.
    reward_weight: float = 0.0
    distill_weight: float = 1.0
    # The reward: math (math-verify on the last \boxed{} against the example's answer; text and
    # VL alike) or choice (a multiple-choice letter). Each item has reward_timeout seconds in the
    # grading worker; a timeout scores 0 and is counted (reward/failed_timeout).
    reward: Literal["math", "choice"] = "math"
    reward_timeout: float = 10.0

    def __post_init__(self) -> None:
        validate_loss_config(self)


@dataclass(frozen=True)
class TeacherConfig:
    kind: Literal["fixed", "live", "ema"] = "fixed"
    ema_decay: float = 0.99
    ema_update_every: int = 1
    # Where the teacher's log-probabilities come from. local: a teacher forward in the trainer.
    # server: the generation server scores the completions in the teacher context (a live
    # teacher only; sampled-token or top-k losses; see opsd_mm.teacher.scoring).
    scoring: Literal["local", "server"] = "local"


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 100
    # Prompts per optimizer step per process; each is sampled rollout.n times.
    batch_size: int = 4
    # Sequences per forward/backward; the step's sequences are split into micro-batches
    # (gradient accumulation), and the loss is normalised by the step's global token count.
    micro_batch_size: int = 4
    # Micro-batches by forward tokens instead (0: off, use micro_batch_size rows): the step's
    # rows, longest first, fill micro-batches of at most this many tokens (a longer row goes
    # alone). With loss.normalize=step_tokens the loss is still the step-wide token mean, so
    # the results do not change (micro_batch_mean averages whatever micro-batches form).
    micro_batch_tokens: int = 0
    # Padding-free forwards: each micro-batch's rows packed into one sequence (per-row position
    # ids, block-diagonal attention); off, or where the model does not support it, rows are
    # padded to the longest (the reference layout).
    packing: bool = True
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    # Horizon of the LR schedule in optimizer steps (null: trainer.max_steps). A recipe that
    # reproduces a reference run decaying over N epochs sets it to that run's total steps and
    # may stop earlier with max_steps.
    schedule_steps: int | None = None
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    save_every: int = 50
    keep_last: int = 2
    # Abort after this many bad steps in a row: a non-finite loss or gradient norm, or no usable
    # completion (every one rejected, e.g. a diverged model sampling ids outside the vocabulary).
    max_bad_steps_in_row: int = 3
    resume: bool = False
    # A fresh run refuses a run_dir holding another run's checkpoints or metrics; with overwrite
    # the old run directory is renamed to <run_dir>.replaced-<time> first (nothing is deleted).
    overwrite: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    report_to: list[str] = field(default_factory=list)
    project: str = "opsd-mm"
    progress: bool = True
    log_every: int = 1
    # Every samples_every steps (0: never), samples_n rendered prompt/completion/teacher-context
    # records go to RUN_DIR/samples.jsonl (and to a tensorboard tracker as text).
    samples_every: int = 10
    samples_n: int = 2


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/default"
    seed: int = 0


# ----------------------------------------------------------------------------- loss rules


def _require(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


_DIVERGENCES = typing.get_args(typing.get_type_hints(LossConfig)["divergence"])


def validate_loss_config(cfg: LossConfig) -> None:
    """Raise a ConfigError naming the ``loss.*`` key when the settings cannot be computed.

    Run by ``LossConfig`` itself when it is made (from YAML, an override, or by a library user
    or test), so no LossConfig exists that the loss cannot compute and the loss functions, called
    per micro-batch and per chunk, never check again. Temperature null means 1 here (it is
    resolved to ``rollout.temperature`` later, by ``resolve_config``).
    """
    _require(
        "loss.divergence",
        cfg.divergence,
        cfg.divergence in _DIVERGENCES,
        f"must be one of {list(_DIVERGENCES)}",
    )
    _require("loss.beta", cfg.beta, 0.0 <= cfg.beta <= 1.0, "must lie in [0, 1]")
    tau = 1.0 if cfg.temperature is None else cfg.temperature
    _require("loss.temperature", cfg.temperature, tau > 0.0, "must be > 0")
    _require("loss.top_k", cfg.top_k, cfg.top_k >= 0, "must be >= 0 (0: full vocabulary)")
    _require(
        "loss.skip_first_tokens", cfg.skip_first_tokens, cfg.skip_first_tokens >= 0, "must be >= 0"
    )
    _require("loss.chunk_size", cfg.chunk_size, cfg.chunk_size >= 0, "must be >= 0 (0: automatic)")
    if cfg.divergence == "sampled_pg":
        if cfg.pointwise_clip is not None:
            raise ConfigError(
                "loss.pointwise_clip does not apply to loss.divergence=sampled_pg (it uses the "
                "sampled token only, there are no vocabulary terms to clip); set "
                "loss.pointwise_clip=null, or use loss.token_clip"
            )
        if cfg.top_k > 0:
            raise ConfigError(
                "loss.top_k does not apply to loss.divergence=sampled_pg (it uses the sampled "
                "token only); set loss.top_k=0"
            )
