"""Run configuration: YAML -> frozen dataclasses, with dotted ``key=value`` overrides.

Why our own loader rather than a config framework: the contract is small (nested frozen
dataclasses, strict keys and types, overrides), and errors must name the offending key in the
user's terms (``loss.beta``), which the generic libraries do not do well.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opsd_mm.errors import UserError


class ConfigError(UserError):
    """A configuration problem; the message names the key (``section.field``)."""

    kind = "config error"


# ----------------------------------------------------------------------------- sections


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
    # or ``synthetic:<task>`` (generated in-process; see opsd_mm.tasks).
    source: str = "synthetic:arithmetic"
    # null: the preset's split (We-Math 2.0 ships ``standard`` / ``pro``), else ``train``.
    split: str | None = None
    subset: str | None = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # A known dataset (opsd_mm.presets): its row mapping, split and teacher template.
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
    # multi-epoch run tokenises and image-processes each example once (opsd_mm/prompt_cache.py;
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
    # (0: a free one). See opsd_mm.rollout_server.
    server_transport: Literal["file", "gloo", "nccl"] = "file"
    server_group_host: str = "127.0.0.1"
    server_group_port: int = 0
    # Generate the next step's rollouts while this step trains (one step off-policy: a batch
    # comes from the weights one optimizer step behind the ones it trains; see
    # opsd_mm.rollout_async). vllm_server only, one trainer process. Spelled ``async`` in YAML
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
    # off. See opsd_mm.importance.
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


_DIVERGENCES = typing.get_args(typing.get_type_hints(LossConfig)["divergence"])


@dataclass(frozen=True)
class TeacherConfig:
    kind: Literal["fixed", "live", "ema"] = "fixed"
    ema_decay: float = 0.99
    ema_update_every: int = 1
    # Where the teacher's log-probabilities come from. local: a teacher forward in the trainer.
    # server: the generation server scores the completions in the teacher context (a live
    # teacher only; sampled-token or top-k losses; see opsd_mm.teacher_scoring).
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


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and args[:1] == (str,):
            # ``logging.report_to=tensorboard`` (or ``a,b``): a string is a comma-separated list.
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


# Config keys that are Python keywords: the YAML / override spelling -> the dataclass field.
_KEY_TO_FIELD = {"async": "async_"}
_FIELD_TO_KEY = {v: k for k, v in _KEY_TO_FIELD.items()}


def _key_hints(cls: type) -> dict[str, Any]:
    """The annotations of ``cls``'s fields under their config spelling (``async``, not
    ``async_``)."""
    return {_FIELD_TO_KEY.get(k, k): tp for k, tp in typing.get_type_hints(cls).items()}


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = _key_hints(cls)
    for k in raw:
        if k not in hints:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(
                f"unknown config key '{where}'; valid keys here: {', '.join(sorted(hints))}"
            )
    kwargs = {}
    for k, v in raw.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[_KEY_TO_FIELD.get(k, k)] = _coerce(v, hints[k], where)
    return cls(**kwargs)


def _field_type(key: str) -> Any:
    """The annotation of a dotted key, or a ConfigError naming it."""
    cls: Any = RunConfig
    tp: Any = None
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{key}'")
        hints = _key_hints(cls)
        if part not in hints:
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"unknown config key '{where}'; valid keys here: {', '.join(sorted(hints))}"
            )
        tp = hints[part]
        cls = tp
    return tp


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, parsed value). Values are YAML scalars (``3``, ``true``,
    ``null``, ``[a, b]``), except for string fields, which take the raw text."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. trainer.max_steps=3)")
    key, text = item.split("=", 1)
    key = key.strip()
    tp = _field_type(key)
    accepts_str = tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    )
    if accepts_str and text not in ("null", "None", "~"):
        return key, text
    try:
        return key, yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {text!r}: {e}") from e


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` (safe loader); a ConfigError naming the file and line when
    it is not UTF-8 text or not valid YAML (PyYAML's own message names ``<unicode string>``)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file "
            "as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (safe loader), apply dotted overrides, validate into RunConfig."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return resolve_config(_build(RunConfig, raw))


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill the values that default to other keys and check the cross-key rules; idempotent.

    - ``loss.temperature`` null -> ``rollout.temperature`` (the reference ties them; the loss
      then scores the distribution the completion was sampled from); an error under greedy
      rollouts (``rollout.temperature=0``).
    - every range check (:func:`validate_config`), so a bad value fails before anything loads.
    - ``processor.student_thinking != processor.teacher_thinking`` is an error unless
      ``processor.allow_thinking_mismatch``.
    """
    pc = cfg.processor
    if pc.student_thinking != pc.teacher_thinking and not pc.allow_thinking_mismatch:
        raise ConfigError(
            f"processor.student_thinking={str(pc.student_thinking).lower()} but "
            f"processor.teacher_thinking={str(pc.teacher_thinking).lower()}: the teacher would "
            "score the student's completion after a different generation prompt (with a hybrid "
            "template one side gets an empty closed think block, and a completion that thinks "
            "then reads as a second think block to the other side). Set both the same, or set "
            "processor.allow_thinking_mismatch=true to do this on purpose"
        )
    if cfg.loss.temperature is None and cfg.rollout.temperature > 0:
        loss = dataclasses.replace(cfg.loss, temperature=cfg.rollout.temperature)
        cfg = dataclasses.replace(cfg, loss=loss)
    validate_config(cfg)
    return cfg


def _require(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def validate_config(cfg: RunConfig) -> None:
    """Every check that needs the config alone, at load time (before any data or model loads):
    the range of every numeric key, the cross-key rules and the loss settings; a ConfigError
    names the first key out of range and what it allows. Checks that need the model's family
    run right after its config.json is read (``opsd_mm.models.check_model_family``); those that
    need the process layout when the Accelerator exists (``opsd_mm.distributed``)."""
    t, r, p, te, lg = cfg.trainer, cfg.rollout, cfg.processor, cfg.teacher, cfg.logging
    at_least_1 = "must be >= 1"
    checks = [
        ("run_dir", cfg.run_dir, cfg.run_dir.strip() != "", "must not be empty"),
        ("trainer.max_steps", t.max_steps, t.max_steps >= 1, at_least_1),
        ("trainer.batch_size", t.batch_size, t.batch_size >= 1, at_least_1),
        ("trainer.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, at_least_1),
        (
            "trainer.micro_batch_tokens",
            t.micro_batch_tokens,
            t.micro_batch_tokens >= 0,
            "must be >= 0 (0: micro-batches of trainer.micro_batch_size rows)",
        ),
        ("trainer.lr", t.lr, t.lr > 0, "must be > 0"),
        ("trainer.weight_decay", t.weight_decay, t.weight_decay >= 0, "must be >= 0"),
        ("trainer.adam_beta1", t.adam_beta1, 0 <= t.adam_beta1 < 1, "must lie in [0, 1)"),
        ("trainer.adam_beta2", t.adam_beta2, 0 <= t.adam_beta2 < 1, "must lie in [0, 1)"),
        ("trainer.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0"),
        (
            "trainer.schedule_steps",
            t.schedule_steps,
            t.schedule_steps is None or t.schedule_steps >= 0,
            "must be >= 0 (null: trainer.max_steps)",
        ),
        (
            "trainer.max_grad_norm",
            t.max_grad_norm,
            t.max_grad_norm is None or t.max_grad_norm > 0,
            "must be > 0 (null: no clipping)",
        ),
        ("trainer.save_every", t.save_every, t.save_every >= 0, "must be >= 0 (0: never)"),
        ("trainer.keep_last", t.keep_last, t.keep_last >= 0, "must be >= 0 (0: keep all)"),
        (
            "trainer.max_bad_steps_in_row",
            t.max_bad_steps_in_row,
            t.max_bad_steps_in_row >= 1,
            "must be >= 1 (bad steps in a row before the run stops)",
        ),
        ("rollout.n", r.n, r.n >= 1, "must be >= 1 (samples per prompt)"),
        ("rollout.temperature", r.temperature, r.temperature >= 0, "must be >= 0 (0: greedy)"),
        ("rollout.top_p", r.top_p, 0 < r.top_p <= 1, "must lie in (0, 1] (1: off)"),
        ("rollout.top_k", r.top_k, r.top_k >= 0, "must be >= 0 (0: off)"),
        ("rollout.min_p", r.min_p, 0 <= r.min_p < 1, "must lie in [0, 1) (0: off)"),
        ("rollout.max_new_tokens", r.max_new_tokens, r.max_new_tokens >= 1, at_least_1),
        ("rollout.sync_every", r.sync_every, r.sync_every >= 1, at_least_1),
        (
            "rollout.gpu_memory_utilization",
            r.gpu_memory_utilization,
            0 < r.gpu_memory_utilization <= 1,
            "must lie in (0, 1]",
        ),
        (
            "rollout.server_url",
            r.server_url,
            r.engine != "vllm_server" or bool(r.server_url),
            "must be set with rollout.engine=vllm_server (e.g. http://127.0.0.1:8765, the "
            "address `opsd-mm serve` prints)",
        ),
        ("rollout.server_timeout_s", r.server_timeout_s, r.server_timeout_s > 0, "must be > 0"),
        ("rollout.server_retries", r.server_retries, r.server_retries >= 0, "must be >= 0"),
        (
            "rollout.server_transport",
            r.server_transport,
            r.server_transport == "file" or r.engine == "vllm_server",
            "applies to rollout.engine=vllm_server only (the colocated vllm engine loads the "
            "weights in its own process)",
        ),
        (
            "rollout.server_group_port",
            r.server_group_port,
            0 <= r.server_group_port <= 65535,
            "must lie in [0, 65535] (0: a free port)",
        ),
        (
            "rollout.async",
            r.async_,
            not r.async_ or r.engine == "vllm_server",
            "true needs rollout.engine=vllm_server: the hf and colocated vllm engines generate "
            "in the training process, with the weights being trained",
        ),
        (
            "loss.importance_clip",
            cfg.loss.importance_clip,
            cfg.loss.importance_clip is None or cfg.loss.importance_clip > 0,
            "must be > 0 (null: off)",
        ),
        (
            "loss.temperature",
            cfg.loss.temperature,
            cfg.loss.temperature is not None,
            "null takes rollout.temperature, which is 0 here (greedy sampling), but the loss "
            "needs a softmax temperature > 0: set loss.temperature (e.g. loss.temperature=1.0)",
        ),
        ("teacher.ema_decay", te.ema_decay, 0 <= te.ema_decay < 1, "must lie in [0, 1)"),
        ("teacher.ema_update_every", te.ema_update_every, te.ema_update_every >= 1, at_least_1),
        ("processor.max_prompt_tokens", p.max_prompt_tokens, p.max_prompt_tokens >= 1, at_least_1),
        ("processor.prompt_cache", p.prompt_cache, p.prompt_cache >= 0, "must be >= 0 (0: off)"),
        (
            "processor.max_teacher_prompt_tokens",
            p.max_teacher_prompt_tokens,
            p.max_teacher_prompt_tokens >= 1,
            at_least_1,
        ),
        ("processor.max_image_pixels", p.max_image_pixels, p.max_image_pixels >= 1, at_least_1),
        (
            "processor.min_pixels",
            p.min_pixels,
            p.min_pixels is None or p.min_pixels >= 1,
            at_least_1,
        ),
        (
            "processor.max_pixels",
            p.max_pixels,
            p.max_pixels is None or p.max_pixels >= 1,
            at_least_1,
        ),
        (
            "processor.max_pixels",
            p.max_pixels,
            None in (p.min_pixels, p.max_pixels) or p.min_pixels <= p.max_pixels,
            f"must be >= processor.min_pixels ({p.min_pixels})",
        ),
        ("model.lora.r", cfg.model.lora.r, cfg.model.lora.r >= 1, at_least_1),
        (
            "model.lora.dropout",
            cfg.model.lora.dropout,
            0 <= cfg.model.lora.dropout < 1,
            "must lie in [0, 1)",
        ),
        ("data.limit", cfg.data.limit, cfg.data.limit is None or cfg.data.limit >= 1, at_least_1),
        ("data.synthetic_size", cfg.data.synthetic_size, cfg.data.synthetic_size >= 1, at_least_1),
        ("logging.log_every", lg.log_every, lg.log_every >= 1, at_least_1),
        ("logging.samples_every", lg.samples_every, lg.samples_every >= 0, "must be >= 0 (0: off)"),
        ("logging.samples_n", lg.samples_n, lg.samples_n >= 1, at_least_1),
    ]
    # A clip <= 0 clips every term (the loss functions allow it; tests use it); from a config
    # it is never meant.
    for key, clip in (
        ("loss.pointwise_clip", cfg.loss.pointwise_clip),
        ("loss.token_clip", cfg.loss.token_clip),
    ):
        checks.append((key, clip, clip is None or clip > 0, "must be > 0 (null: no clip)"))
    lo = cfg.loss
    checks += [
        ("loss.reward_weight", lo.reward_weight, lo.reward_weight >= 0, "must be >= 0 (0: off)"),
        ("loss.distill_weight", lo.distill_weight, lo.distill_weight >= 0, "must be >= 0"),
        (
            "loss.distill_weight",
            lo.distill_weight,
            lo.distill_weight > 0 or lo.reward_weight > 0,
            "0 together with loss.reward_weight=0 leaves no loss; set one of them > 0",
        ),
        ("loss.reward_timeout", lo.reward_timeout, lo.reward_timeout > 0, "must be > 0 seconds"),
        (
            "rollout.n",
            r.n,
            lo.reward_weight == 0 or r.n >= 2,
            "must be >= 2 with loss.reward_weight > 0 (the advantage compares the samples of "
            "one prompt; one sample gives advantage 0)",
        ),
    ]
    for key, value, ok, allowed in checks:
        _require(key, value, ok, allowed)
    if te.scoring == "server":
        _check_server_scoring(cfg)
    if p.kind not in ("auto", "text") and p.student_prompt_format != "chat_template":
        raise ConfigError(
            f"processor.student_prompt_format={p.student_prompt_format} is not supported with "
            f"processor.kind={p.kind} (stripping special tokens would remove the vision start/end "
            "and image pad tokens the images are placed by); use chat_template"
        )
    validate_loss_config(cfg.loss)


def _check_server_scoring(cfg: RunConfig) -> None:
    """``teacher.scoring=server`` is exact only when the server's forward is the teacher's: a
    ConfigError naming the first key that breaks it, and why."""
    r, lo, m = cfg.rollout, cfg.loss, cfg.model
    why = "teacher.scoring=server"
    kind = cfg.teacher.kind
    rules = [
        (
            "rollout.engine",
            r.engine,
            r.engine == "vllm_server",
            f"{why} needs rollout.engine=vllm_server (the teacher is scored by the generation "
            "server)",
        ),
        (
            "teacher.kind",
            kind,
            kind in ("live", "fixed"),
            f"{why} needs teacher.kind=live (the server holds the current weights) or fixed "
            "under LoRA (the server's base weights); an EMA teacher would need a second copy "
            "of the model there",
        ),
    ]
    if kind == "fixed":
        rules += [
            (
                "model.lora.enabled",
                m.lora.enabled,
                m.lora.enabled,
                f"{why} with teacher.kind=fixed needs model.lora.enabled=true: the server "
                "serves the base as the teacher and the adapter as the student",
            ),
            (
                "model.train_projector",
                m.train_projector,
                not m.train_projector,
                f"{why} with teacher.kind=fixed needs model.train_projector=false: only the "
                "LoRA adapter may train, so that the server's base stays the initial model",
            ),
            (
                "model.train_vision_tower",
                m.train_vision_tower,
                not m.train_vision_tower,
                f"{why} with teacher.kind=fixed needs model.train_vision_tower=false: only the "
                "LoRA adapter may train, so that the server's base stays the initial model",
            ),
            (
                "rollout.server_transport",
                r.server_transport,
                r.server_transport == "file",
                f"{why} with teacher.kind=fixed needs rollout.server_transport=file: the server "
                "loads the adapter as a peft directory (megabytes; the base goes once)",
            ),
        ]
    else:
        rules += [
            (
                "rollout.sync_every",
                r.sync_every,
                r.sync_every == 1,
                f"{why} with teacher.kind=live needs rollout.sync_every=1: the server must hold "
                "exactly the weights being trained, or the live teacher would be a stale one",
            ),
            (
                "rollout.async",
                r.async_,
                not r.async_,
                f"{why} with teacher.kind=live needs rollout.async=false: asynchronous rollouts "
                "leave the server one optimizer step behind the weights being trained",
            ),
        ]
    rules += [
        (
            "loss.temperature",
            lo.temperature,
            lo.temperature == 1.0,
            f"{why} needs loss.temperature=1.0: the server returns temperature-1 log-probabilities "
            "(set loss.temperature=1.0 explicitly to score a tempered rollout)",
        ),
        (
            "loss.divergence",
            lo.divergence,
            lo.divergence == "sampled_pg" or lo.top_k > 0,
            f"{why} needs loss.divergence=sampled_pg or loss.top_k > 0: a full-vocabulary "
            "divergence needs the teacher's whole distribution, which the server does not send",
        ),
    ]
    for key, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{key}={_show(value)}: {allowed}")


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def validate_loss_config(cfg: LossConfig) -> None:
    """Raise a ConfigError naming the ``loss.*`` key when the settings cannot be computed.

    Called at load (:func:`validate_config`) and again by the loss functions, which tests and
    library users call with a LossConfig of their own (temperature null there means 1).
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


# Keys whose values are secrets: written and logged as SECRET_MASK when set.
SECRET_KEYS = ("rollout.server_token",)
SECRET_MASK = "***"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as the nested dict that is written (``config.yaml``) and logged (tracker
    hyper-parameters): keys spelled as in YAML, secrets (``SECRET_KEYS``) masked, so a run
    directory or a dashboard never holds a bearer token."""
    d = _rename_keys(dataclasses.asdict(cfg))
    for key in SECRET_KEYS:
        *parents, last = key.split(".")
        node = d
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(last) is not None:
            node[last] = SECRET_MASK
    return d


def _rename_keys(d: dict[str, Any]) -> dict[str, Any]:
    return {
        _FIELD_TO_KEY.get(k, k): _rename_keys(v) if isinstance(v, dict) else v for k, v in d.items()
    }


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
