"""The run configuration's sections: frozen dataclasses, one per YAML section.

Each field's comment (the ``#`` lines right above it) is its documentation, and each class's
docstring documents its section: ``opsd-mm config reference`` turns them into docs/config.md, so
write them for a user, one comment block per field. Loading (YAML, overrides, saving) is in
``opsd_mm.config.load``; checks (resolve, validate) in ``opsd_mm.config.checks``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from opsd_mm.errors import ConfigError


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter on the language model (the default), or full fine-tuning."""

    # Train a LoRA adapter; false: full fine-tuning of every weight (the vision tower and the
    # projector only as model.train_vision_tower / model.train_projector say).
    enabled: bool = True
    # LoRA rank of each adapted projection.
    r: int = 16
    # LoRA scaling numerator: the adapter's update is scaled by alpha / r.
    alpha: int = 32
    # Dropout on the adapter's input during training, in [0, 1).
    dropout: float = 0.0
    # Regex over module names: the language model's projections only (for VL models this
    # leaves the vision tower alone; a plain name list would also wrap Qwen2.5-VL's vision MLP).
    target_regex: str = (
        r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    )


@dataclass(frozen=True)
class ModelConfig:
    """The model to train: where it comes from, how it loads, and what of it trains."""

    # A hub id, a local directory, or ``tiny:<name>`` for a tiny offline model built on first use.
    name_or_path: str = "tiny:text"
    # Weight dtype: auto (bfloat16 on CUDA, float32 on CPU) or the one named.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Attention implementation passed to transformers (sdpa, eager, flash_attention_2, ...).
    attn_implementation: str = "sdpa"
    # Hub revision of the model (a branch, tag or commit; null: the default branch).
    revision: str | None = None
    # Let transformers run code shipped in the model's repository (some hub models need it).
    trust_remote_code: bool = False
    # The LoRA adapter, or full fine-tuning (the model.lora keys).
    lora: LoraConfig = field(default_factory=LoraConfig)
    # VL only: also train the projector (the vision-language merger) besides the language model.
    train_projector: bool = False
    # VL only: also train the vision tower (false: frozen, which lets processor.reuse_vision
    # share its encodings); under full fine-tuning the projector then trains too.
    train_vision_tower: bool = False
    # Where ``tiny:`` models are built (default: ~/.cache/opsd-mm/tiny).
    tiny_cache_dir: str | None = None


@dataclass(frozen=True)
class ColumnsConfig:
    """Without ``data.preset``: which dataset column feeds each field of an example (null: the
    field is absent). Ignored when a preset is set: the preset maps its dataset's rows."""

    # Column of each row's id (null: ``row-N``, by position).
    id: str | None = None
    # Column of the question, which the student and the teacher both see.
    question: str = "problem"
    # Column of the privileged text only the teacher sees, e.g. a reference solution (null: none).
    privileged: str | None = "solution"
    # Column of the final answer, for teacher templates that show {answer} and for rewards
    # (null: none).
    answer: str | None = None
    # Column of the question's images: paths, bytes or images, one or a list (null: text only).
    images: str | None = None
    # Column of extra images only the teacher sees (null: none).
    teacher_images: str | None = None
    # Column of regions on the question's images, which the crop, zoom and mark view operations
    # read: per image a box [x0, y0, x1, y1] or a list of boxes (data.region_coords says their
    # units); see docs/vision-language.md#regions (null: none).
    regions: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """The training rows: where they come from, how rows map to examples, which are kept."""

    # A hub dataset id, a local .json/.jsonl/.parquet file, a ``save_to_disk`` directory,
    # or ``synthetic:<task>`` (generated in-process; see opsd_mm.data.tasks).
    source: str = "synthetic:arithmetic"
    # null: the preset's split (We-Math 2.0 ships ``standard`` / ``pro``), else ``train``.
    split: str | None = None
    # A hub dataset's configuration name (the second argument of datasets.load_dataset; null:
    # its default).
    subset: str | None = None
    # Without a preset: which column feeds each example field (the data.columns keys).
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # A known dataset (opsd_mm.data.presets): its row mapping, split and teacher template.
    preset: str | None = None
    # Units of the boxes in data.columns.regions: pixel (of the original image), normalized
    # (fractions in [0, 1]) or normalized_1000 (0-1000, as Qwen2-VL grounding writes them).
    region_coords: Literal["pixel", "normalized", "normalized_1000"] = "pixel"
    # Base directory for relative image paths (null: the directory of data.source).
    data_dir: str | None = None
    # A bad row (missing what the teacher template shows, or an image that is not found):
    # skip drops it (counted, logged with its id); raise stops with an error naming it.
    bad_row_policy: Literal["skip", "raise"] = "skip"
    # null: rows must hold what the teacher template shows ({privileged} and/or {answer});
    # true/false force or waive the privileged-text requirement.
    require_privileged: bool | None = None
    # Use only the first this many rows (null: all).
    limit: int | None = None
    # Shuffle the examples every epoch, in an order drawn from ``seed`` (a resumed run
    # continues it); false: the source's order.
    shuffle: bool = True
    # Examples generated for a ``synthetic:`` source.
    synthetic_size: int = 256
    # Drop training rows whose question (n-gram overlap) or image (perceptual hash) matches an
    # item of data.contamination_benchmarks.
    exclude_contaminated: bool = False
    # The benchmarks exclude_contaminated checks against (and ``opsd-mm data check``'s default).
    contamination_benchmarks: list[str] = field(
        default_factory=lambda: [
            "mmmu", "mathvision", "mathvista", "wemath", "zerobench",
            "math500", "aime24", "aime25", "hmmt25",
        ]
    )  # fmt: skip
    # Where those benchmarks are read from: save_to_disk copies named after the benchmarks, as
    # for ``opsd-mm eval --data-dir`` (null: the hub).
    contamination_data_dir: str | None = None


# View operations that draw random numbers: they apply only where the trainer passes a seed (its
# student prompts, seeded per step and example), never in the teacher's view.
RANDOM_VIEW_OPS = frozenset({"random_crop"})
# View operations that read the example's regions (``data.columns.regions``).
REGION_VIEW_OPS = frozenset({"crop", "zoom", "mark"})


@dataclass(frozen=True)
class ViewOpConfig:
    """One image operation of a role's view: an item of ``processor.student_view``,
    ``processor.teacher_view`` or ``processor.gain_view``
    (docs/vision-language.md#image-views-privilege-in-the-pixels). A key that does not apply to
    the item's ``op`` is a config error; a key left null takes the default its row names."""

    # The operation. resolution: this role's pixel bounds for the final resize (wherever it
    # stands in the list). crop / zoom: cut the image to its region (the union of its boxes,
    # plus margin); zoom then resizes the cut to ``pixels``. mark: draw each box on the image.
    # downscale, jpeg, blur, grayscale: degradations. random_crop: a random window (student
    # view only; seeded per step and example).
    op: Literal[
        "resolution", "crop", "zoom", "mark", "downscale", "jpeg", "blur", "grayscale",
        "random_crop",
    ]  # fmt: skip
    # resolution: the fewest pixels an image of this role is resized to (null:
    # processor.min_pixels, or this view's max_pixels if that is lower).
    min_pixels: int | None = None
    # resolution: the most pixels an image of this role is resized to (null:
    # processor.max_pixels).
    max_pixels: int | None = None
    # crop, zoom, mark: room added around the region on each side, as a fraction of its width
    # and height (null: 0).
    margin: float | None = None
    # zoom: the cut region is resized to about this many pixels, aspect ratio kept (null: the
    # role's max_pixels); the final resize still keeps it within the role's bounds.
    pixels: int | None = None
    # crop, zoom: replace puts the cut in place of the image; extra keeps the image and adds the
    # cut right after it (null: replace). An image without a region is left as it is.
    placement: Literal["replace", "extra"] | None = None
    # mark: box draws each box's outline; dim darkens everything outside the boxes (null: box).
    style: Literal["box", "dim"] | None = None
    # mark: the outline's colour, a PIL colour name or #rrggbb (null: red).
    color: str | None = None
    # mark: the outline's width in pixels of the image as it is at that point (null: 3).
    width: int | None = None
    # downscale: each side is scaled by this factor in (0, 1] (bilinear) and restored to its
    # size (nearest): pixelation at an unchanged token count (null: 0.25).
    factor: float | None = None
    # jpeg: the JPEG quality, 1-95, the image is encoded and decoded at (null: 30).
    quality: int | None = None
    # blur: the Gaussian blur radius in pixels (null: 2.0).
    radius: float | None = None
    # random_crop: the smallest fraction of each side the random window keeps, in (0, 1]
    # (null: 0.8).
    scale: float | None = None
    # downscale, jpeg, blur, grayscale: the probability, drawn per step, example and image, that
    # the operation applies (null: 1, always). Below 1 it is random: student view only.
    p: float | None = None

    @property
    def random(self) -> bool:
        """Draws random numbers: random_crop, or a probability below 1."""
        return self.op in RANDOM_VIEW_OPS or (self.p is not None and self.p < 1)


def view_is_random(ops: list[ViewOpConfig]) -> bool:
    """A view some of whose operations draw random numbers (seeded per step and example)."""
    return any(op.random for op in ops)


@dataclass(frozen=True)
class ProcessorConfig:
    """How examples become prompts: chat templates, thinking mode, token budgets, images."""

    # The processor family; auto: from the model's type (qwen2_vl, qwen2_5_vl or qwen3_vl for
    # those vision-language models, text for any other). A VL kind on a text model is an error.
    kind: Literal["auto", "text", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "auto"
    # The student's message template (opsd_mm.processors.templates): opsd_student_v1 (the OPSD
    # reference's) or plain (the question verbatim).
    student_template: str = "opsd_student_v1"
    # The teacher's message template, which shows the privileged information: opsd_teacher_v1
    # (a reference solution), opsd_teacher_v0, answer_only_v1 (the final answer), hint_v1,
    # question_only_v1 (no privileged text: the privilege is in teacher_view's pixels), or
    # same_as_student: exactly the student's context, nothing privileged (plain on-policy
    # distillation from another model). Left at this default, a data.preset sets its own.
    teacher_template: str = "opsd_teacher_v1"
    # Thinking mode of the student prompt (the chat template's ``enable_thinking``).
    student_thinking: bool = False
    # Thinking mode of the teacher prompt. A difference from student_thinking is a config error
    # unless allow_thinking_mismatch=true: the teacher would score the student's completion
    # after a different generation prompt (e.g. an empty closed think block on one side only).
    teacher_thinking: bool = False
    # Allow student_thinking and teacher_thinking to differ, on purpose.
    allow_thinking_mismatch: bool = False
    # How the student prompt is tokenised. ``chat_template``: the ids of one chat-template
    # application. ``specials_stripped``: the OPSD reference's documented quirk (its reported
    # results): the chat-template text with every special token removed, then tokenised as plain
    # text, so the student sees ``user\n...\nassistant\n`` without <|im_start|>/<|im_end|>.
    student_prompt_format: Literal["chat_template", "specials_stripped"] = "chat_template"
    # Student prompt budget in tokens: an example whose student prompt is longer is skipped
    # (counted). With rollout.engine=vllm it also sizes the engine's context (+ max_new_tokens).
    max_prompt_tokens: int = 1024
    # Teacher prompt budget: the privileged text is truncated (and counted) to fit it.
    max_teacher_prompt_tokens: int = 4096
    # VL: the fewest pixels an image is resized to (qwen_vl_utils semantics; null: the model's
    # image processor's setting).
    min_pixels: int | None = None
    # VL: the most pixels an image is resized to (qwen_vl_utils semantics; null: the model's
    # image processor's setting).
    max_pixels: int | None = None
    # An image with more pixels than this is a bad image, rejected before it is decoded (a
    # decompression-bomb guard).
    max_image_pixels: int = 50_000_000
    # A bad image (unreadable, missing, too large): skip drops its example (counted); raise
    # stops with an error naming the example and the file.
    bad_image_policy: Literal["skip", "raise"] = "skip"
    # Encode each image once per step and share it between the teacher and student forwards
    # (only while the vision tower is frozen; numerically identical to re-encoding).
    reuse_vision: bool = True
    # Keep up to this many rendered prompts per side (student, teacher) across epochs, so a
    # multi-epoch run tokenises and image-processes each example once (opsd_mm/train/prompt_cache.py;
    # identical prompts). 0: render every time. Memory: the prompts' ids and pixel tensors.
    prompt_cache: int = 0
    # VL: the student's view, a list of image operations applied to each question image before
    # the chat template and the image processor (the items' keys: below;
    # docs/vision-language.md#image-views-privilege-in-the-pixels). Empty: the images as they are.
    student_view: list[ViewOpConfig] = field(default_factory=list)
    # VL: the teacher's view, like student_view: what the teacher sees of the same images (a
    # higher resolution, a zoomed region, the region marked). Teacher-only images are not
    # viewed (only resized to the view's resolution).
    teacher_view: list[ViewOpConfig] = field(default_factory=list)
    # VL: the view the view gain (logging.view_gain_every, loss.view_weighting) compares the
    # teacher's with, rendered in the teacher's context; null: the student's view (the same
    # pixels the student saw). VA-OPD's setting: the student and teacher see the image, the
    # gain's view is a pixelated copy.
    gain_view: list[ViewOpConfig] | None = None


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling the student's completions: the engine, the sampling settings, and the
    generation server's connection and weight sync."""

    # hf: transformers generate; vllm: colocated vLLM; vllm_server: an ``opsd-mm serve`` process.
    engine: Literal["hf", "vllm", "vllm_server"] = "hf"
    # Completions sampled per prompt (the group over which loss.reward_weight's advantage is
    # normalised).
    n: int = 1
    # Sampling temperature (0: greedy); also the loss temperature while loss.temperature is null.
    temperature: float = 1.0
    # Nucleus sampling: sample from the smallest set of tokens holding this much probability
    # (1: off).
    top_p: float = 1.0
    # Sample from the k most likely tokens only (0: off).
    top_k: int = 0
    # Drop the tokens less likely than min_p times the most likely one (0: off).
    min_p: float = 0.0
    # The most tokens generated per completion.
    max_new_tokens: int = 256
    # Re-sync engine weights every this many optimizer steps (vllm, vllm_server; the hf engine
    # samples from the weights being trained).
    sync_every: int = 1
    # vllm: the fraction of the GPU's memory the colocated engine takes (weights, KV cache).
    gpu_memory_utilization: float = 0.3
    # vllm on a GPU: offload the engine's weights and drop its KV cache after each generation,
    # so training has the memory back (ignored on a CPU).
    vllm_sleep_mode: bool = False
    # vllm_server: the server's base URL (http://127.0.0.1:8765, the address ``opsd-mm serve``
    # prints); required with that engine.
    server_url: str | None = None
    # vllm_server: the server's bearer token (null: the OPSD_MM_SERVER_TOKEN environment
    # variable, which keeps it out of the run's config.yaml; a token set here is written masked).
    server_token: str | None = None
    # vllm_server: the per-request timeout in seconds.
    server_timeout_s: float = 600.0
    # vllm_server: the retries of a failed request (timeouts, a restarting server) before the
    # run stops.
    server_retries: int = 3
    # Where the trainer writes the safetensors the server reloads (a path both can read;
    # null: RUN_DIR/engine_weights).
    server_sync_dir: str | None = None
    # How synced weights reach the server: file (safetensors in server_sync_dir, reloaded), or
    # broadcast over a two-process group the trainer hosts: gloo (TCP, any device, any machine)
    # or nccl (GPU to GPU). See opsd_mm.rollout.client.
    server_transport: Literal["file", "gloo", "nccl"] = "file"
    # gloo/nccl transport: the address the server reaches the trainer's group at.
    server_group_host: str = "127.0.0.1"
    # gloo/nccl transport: the group's port (0: a free one).
    server_group_port: int = 0
    # vllm_server: take the server even while another run's claim on it is alive (that run then
    # stops with a message). For a run that died without releasing it; a claim also lapses by
    # itself (``opsd-mm serve --claim-lease-s``, default 60 s after the run's last request).
    server_takeover: bool = False
    # Generate the next step's rollouts while this step trains (one step off-policy: a batch
    # comes from the weights one optimizer step behind the ones it trains; see
    # opsd_mm.rollout.prefetch). vllm_server only, one trainer process. Spelled ``async`` in YAML
    # and overrides (rollout.async=true): ``async`` is a Python keyword.
    async_: bool = False


@dataclass(frozen=True)
class LossConfig:
    """The distillation loss between the student's and the teacher's next-token
    distributions on the student's completions, and an optional verifiable reward."""

    # jsd (generalized, beta), forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher),
    # sampled_pg = sampled-token reverse-KL policy gradient.
    divergence: Literal["jsd", "forward_kl", "reverse_kl", "sampled_pg"] = "jsd"
    # jsd: the teacher's weight in the mixture M = beta*teacher + (1-beta)*student, as in the GKD
    # paper and TRL; 0 is exactly forward KL, 1 exactly reverse KL. In [0, 1].
    beta: float = 0.5
    # Teacher top-k support: the divergence over the teacher's k most likely tokens at each
    # position, renormalised (0: the full vocabulary).
    top_k: int = 0
    # With top_k: keep each distribution's remaining mass as one extra bin (the tail bucket)
    # instead of renormalising over the k tokens.
    top_k_tail_bucket: bool = False
    # Point-wise clip of each vocabulary term of the divergence (OPSD v3 uses 0.05; null: off).
    # Not with sampled_pg.
    pointwise_clip: float | None = None
    # Per-token clip: each token's loss is clamped to at most this (for sampled_pg, the token's
    # estimate before it becomes the advantage; null: off).
    token_clip: float | None = None
    # Leave each completion's first this many tokens out of the loss.
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
    # Who computes each chunk's divergence and logit gradient on the fused path: triton (our
    # Triton kernel, opsd_mm/loss/triton_divergence.py: the logits read in their own dtype,
    # the gradient written over them, no [chunk x vocab] fp32 buffer), torch (the closed form
    # in torch, or torch.compile with loss.compile), or auto: triton on CUDA when Triton
    # imports and loss.compile is off, torch otherwise.
    kernel: Literal["auto", "triton", "torch"] = "auto"
    # Truncated importance weight min(p_trainer(y) / p_rollout(y), c) per sampled token,
    # detached, multiplying the per-token loss (engine/trainer mismatch, stale weights); null:
    # off. See opsd_mm.loss.importance.
    importance_clip: float | None = None
    # Verifiable reward beside the teacher (docs/rewards.md): loss = distill_weight * the
    # distillation term + reward_weight * the policy-gradient term -A * log p_s(y) on the sampled
    # tokens, A the GRPO group-normalised advantage over the rollout.n samples of each prompt
    # (rollout.n >= 2). 0: pure OPSD (no reward is computed).
    reward_weight: float = 0.0
    # The distillation term's weight (see reward_weight); 0: plain GRPO (needs reward_weight > 0).
    distill_weight: float = 1.0
    # The reward: math (math-verify on the last \boxed{} against the example's answer; text and
    # VL alike) or choice (a multiple-choice letter).
    reward: Literal["math", "choice"] = "math"
    # Seconds each item has in the grading worker; a timeout scores 0 and is counted
    # (reward/failed_timeout).
    reward_timeout: float = 10.0
    # va_opd: weight the distillation term as VA-OPD does (arXiv 2605.21924) with the view gain
    # (logging.view_gain_every), computed every step: each prompt's rollouts reweighted by a
    # softmax of their mean positive gain, and within a rollout the high-gain and low-gain
    # tokens averaged as two groups. none: every token weighs the same.
    view_weighting: Literal["none", "va_opd"] = "none"
    # va_opd: the softmax temperature over a prompt's z-scored rollout means, > 0.
    va_temperature: float = 1.0
    # va_opd: the share of each rollout's tokens, by gain, in the high group (rounded up), in
    # (0, 1].
    va_high_fraction: float = 0.2
    # va_opd: the share of each rollout's weight the high group gets (the low group the rest),
    # in [0, 1].
    va_high_weight: float = 0.5

    def __post_init__(self) -> None:
        validate_loss_config(self)


@dataclass(frozen=True)
class TeacherModelConfig:
    """A separate checkpoint as the teacher (``teacher.kind=model``, or a ``model`` entry of
    ``teachers``): frozen, in eval mode, never in the optimizer. Its tokenizer must be the
    student's (every token id and special token, checked before any weight loads); its chat
    template and image processing are its own, and it scores the student's completion ids token
    for token after its own rendering of the teacher context (docs/teachers.md)."""

    # A hub id, a local directory, or ``tiny:<name>`` (e.g. tiny:text-teacher, a 4-layer tiny
    # teacher on the tiny student's tokenizer); required for a model teacher. Scored on a
    # server, only its tokenizer and processor files are read here.
    name_or_path: str | None = None
    # Weight dtype: auto (bfloat16 on CUDA, float32 on CPU) or the one named.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # A LoRA adapter directory (peft) merged into the teacher's weights when it loads (null:
    # none).
    adapter: str | None = None
    # Attention implementation passed to transformers (sdpa, eager, flash_attention_2, ...).
    attn_implementation: str = "sdpa"
    # Hub revision of the teacher (a branch, tag or commit; null: the default branch).
    revision: str | None = None
    # Let transformers run code shipped in the teacher's repository.
    trust_remote_code: bool = False
    # Keep the teacher's weights in CPU memory and move them to the device for each of its
    # forwards (between micro-batches the device holds the student alone): a large teacher
    # fits beside the student at the cost of one transfer per micro-batch. Not under FSDP2,
    # which shards the teacher instead.
    offload: bool = False


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: the student's own weights in the privileged context (self-distillation), or
    a separate checkpoint (distillation), with which weights, scored where, and, with a
    ``teachers`` mapping, which teacher scores which example."""

    # Which weights the teacher uses: fixed (the initial model; under LoRA the base with the
    # adapter disabled), live (the current weights), ema (a moving average of them), or model
    # (the separate checkpoint of teacher.model.*). With a ``teachers`` mapping: the weights of
    # its ``self`` entry.
    kind: Literal["fixed", "live", "ema", "model"] = "fixed"
    # ema: each update sets ema = ema_decay * ema + (1 - ema_decay) * current, in [0, 1).
    ema_decay: float = 0.99
    # ema: update the average every this many optimizer steps.
    ema_update_every: int = 1
    # Where the teacher's log-probabilities come from. local: a teacher forward in the trainer.
    # server: scored by a vLLM server (sampled-token or top-k losses; see
    # opsd_mm.teacher.scoring): for the student's own weights the generation server at
    # rollout.server_url (a live teacher, or a fixed one under LoRA whose base the server
    # holds); for teacher.kind=model the server at teacher.server_url.
    scoring: Literal["local", "server"] = "local"
    # teacher.kind=model: the checkpoint (the teacher.model.* keys).
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    # teacher.kind=model with teacher.scoring=server: the base URL of an ``opsd-mm serve
    # TEACHER`` process that scores the completions (not the generation server; its bearer
    # token is rollout.server_token's, its timeout and retries rollout.server_timeout_s and
    # rollout.server_retries).
    server_url: str | None = None
    # With a ``teachers`` mapping: the data column (Example.meta key) whose value chooses each
    # example's teacher, e.g. source or subject (required with ``teachers``).
    route_by: str | None = None
    # With route_by: column value -> teacher name, for values that are not teacher names
    # themselves (empty: a value names its teacher).
    routes: dict[str, str] = field(default_factory=dict)
    # With route_by: the teacher of an example whose value names no teacher, or that has no
    # value (null: teacher.unrouted_policy decides).
    route_default: str | None = None
    # With route_by and no route_default, an example whose value names no teacher: skip drops
    # it (counted as skipped/run/unrouted, logged with its id and value); raise stops with an
    # error naming it.
    unrouted_policy: Literal["skip", "raise"] = "skip"


@dataclass(frozen=True)
class TeacherSpec:
    """One entry of the ``teachers`` mapping (``teachers.NAME.*``): a separate checkpoint, or
    the student's own weights (``self``, as ``teacher.kind`` and ``teacher.scoring`` say)."""

    # model: the checkpoint of teachers.NAME.model.*; self: the student's own weights (at most
    # one such entry; teacher.kind (fixed, live or ema) and teacher.scoring say which and where).
    kind: Literal["model", "self"] = "model"
    # kind=model: the checkpoint (the teachers.NAME.model.* keys).
    model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    # kind=model: local (a forward in the trainer) or server (scored by the ``opsd-mm serve``
    # process at teachers.NAME.server_url).
    scoring: Literal["local", "server"] = "local"
    # kind=model with scoring=server: that server's base URL.
    server_url: str | None = None


@dataclass(frozen=True)
class TrainerConfig:
    """The optimisation: steps, batches, AdamW and its schedule, precision, checkpoints."""

    # Optimizer steps to train for.
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
    # ids, block-diagonal attention). true: packed wherever the model supports it; false: rows
    # padded to the longest (the reference layout). auto: packed where an attention that skips
    # the packed block's masked-off parts runs (CUDA: flash-attention's varlen kernel when
    # installed, else flex attention; the packed forwards switch to it), and without one (a CPU)
    # only for row micro-batches, not token budgets (docs/performance.md). The log says which.
    packing: bool | Literal["auto"] = "auto"
    # AdamW's peak learning rate (after the warm-up, before the schedule's decay).
    lr: float = 2e-4
    # AdamW's (decoupled) weight decay.
    weight_decay: float = 0.0
    # AdamW's beta1 (momentum), in [0, 1).
    adam_beta1: float = 0.9
    # AdamW's beta2 (second-moment decay), in [0, 1).
    adam_beta2: float = 0.999
    # Optimizer steps of linear warm-up from 0 to lr (linear and cosine schedules; the
    # constant schedule has none).
    warmup_steps: int = 0
    # The learning rate after the warm-up: constant, or a linear or cosine decay to 0 at
    # schedule_steps (transformers' get_scheduler).
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    # Horizon of the LR schedule in optimizer steps (null: trainer.max_steps). A recipe that
    # reproduces a reference run decaying over N epochs sets it to that run's total steps and
    # may stop earlier with max_steps.
    schedule_steps: int | None = None
    # Clip the gradients' global norm to this (null: no clipping); the norm is logged either way.
    max_grad_norm: float | None = 1.0
    # Mixed precision of the forwards and backwards (accelerate): auto (bf16 on CUDA, none on
    # CPU), no, or bf16.
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # Recompute activations in the backward pass instead of keeping them (less memory, more
    # compute).
    gradient_checkpointing: bool = False
    # Write a checkpoint every this many optimizer steps and at the last one (0: only when a
    # stop signal, SIGTERM or Ctrl-C, ends the run early).
    save_every: int = 50
    # Checkpoints to keep, the newest (0: keep all).
    keep_last: int = 2
    # Abort after this many bad steps in a row: a non-finite loss or gradient norm, or no usable
    # completion (every one rejected, e.g. a diverged model sampling ids outside the vocabulary).
    max_bad_steps_in_row: int = 3
    # Continue the run in run_dir from its latest checkpoint (``opsd-mm train --resume``; none
    # there: start from step 0).
    resume: bool = False
    # A fresh run refuses a run_dir holding another run's checkpoints or metrics; with overwrite
    # the old run directory is renamed to ``<run_dir>.replaced-<time>`` first (nothing is
    # deleted).
    overwrite: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    """Metrics, trackers, the progress bar and sample records (RUN_DIR/metrics.jsonl is
    written whatever the trackers)."""

    # Experiment trackers for the metrics and the config (accelerate's names, e.g. tensorboard,
    # wandb; empty: none). A comma-separated string works too.
    report_to: list[str] = field(default_factory=list)
    # The trackers' project name.
    project: str = "opsd-mm"
    # Show a progress bar (on the main process).
    progress: bool = True
    # Write the step metrics (metrics.jsonl, trackers) every this many optimizer steps.
    log_every: int = 1
    # Every samples_every steps (0: never), rendered prompt/completion/teacher-context records
    # go to RUN_DIR/samples.jsonl (and to a tensorboard tracker as text).
    samples_every: int = 10
    # Records written each time (see samples_every).
    samples_n: int = 2
    # Every this many steps (0: never), the teacher scores the step's completions once more with
    # the student's view of the images, and metrics.jsonl gets the view gain: the teacher's
    # per-token log-prob with its own view minus with the student's (view_gain/mean,
    # view_gain/positive_share). Two extra teacher forwards on those steps.
    view_gain_every: int = 0


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one YAML file, a mapping of the sections below plus ``run_dir`` and
    ``seed``."""

    # The model to train (the model.* keys).
    model: ModelConfig = field(default_factory=ModelConfig)
    # The training data (the data.* keys).
    data: DataConfig = field(default_factory=DataConfig)
    # Prompt rendering (the processor.* keys).
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    # Sampling the student's completions (the rollout.* keys).
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # The loss (the loss.* keys).
    loss: LossConfig = field(default_factory=LossConfig)
    # The teacher (the teacher.* keys).
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Several teachers, by name (each a teachers.NAME section), chosen per example by
    # teacher.route_by; empty: the one teacher of the teacher section.
    teachers: dict[str, TeacherSpec] = field(default_factory=dict)
    # The optimisation and checkpoints (the trainer.* keys).
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Metrics and trackers (the logging.* keys).
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # The run's directory: config.yaml (the resolved config), metrics.jsonl, samples.jsonl and
    # checkpoints/; one run per directory (see trainer.resume, trainer.overwrite).
    run_dir: str = "runs/default"
    # Seed of the run's randomness: torch and Python's initial state, the data order and each
    # step's sampling.
    seed: int = 0


# The name of the one teacher of a run without a ``teachers`` mapping (metrics, routing).
SINGLE_TEACHER = "teacher"


def teacher_specs(cfg: RunConfig) -> dict[str, TeacherSpec]:
    """The run's teachers by name: the ``teachers`` mapping, or the teacher section's one
    teacher as a mapping of one (``SINGLE_TEACHER``), so every consumer handles one shape."""
    if cfg.teachers:
        return dict(cfg.teachers)
    te = cfg.teacher
    kind = "model" if te.kind == "model" else "self"
    return {
        SINGLE_TEACHER: TeacherSpec(
            kind=kind, model=te.model, scoring=te.scoring, server_url=te.server_url
        )
    }


def teacher_key(cfg: RunConfig, name: str) -> str:
    """The config prefix of teacher ``name``, as errors name it: ``teachers.NAME``, or
    ``teacher`` for the teacher section's one teacher."""
    return f"teachers.{name}" if cfg.teachers else "teacher"


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
    _require("loss.va_temperature", cfg.va_temperature, cfg.va_temperature > 0, "must be > 0")
    _require(
        "loss.va_high_fraction",
        cfg.va_high_fraction,
        0 < cfg.va_high_fraction <= 1,
        "must lie in (0, 1]",
    )
    _require(
        "loss.va_high_weight",
        cfg.va_high_weight,
        0 <= cfg.va_high_weight <= 1,
        "must lie in [0, 1]",
    )
    if cfg.kernel == "triton":
        if not cfg.fused:
            raise ConfigError(
                "loss.kernel=triton is the fused path's chunk kernel; with loss.fused=false "
                "there is none: set loss.fused=true, or loss.kernel=auto"
            )
        if cfg.compile:
            raise ConfigError(
                "loss.kernel=triton and loss.compile=true are two ways to fuse a chunk's "
                "divergence: set loss.compile=false (or loss.kernel=torch to compile)"
            )
