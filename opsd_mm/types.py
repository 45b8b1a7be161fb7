"""Plain data passed between processors, rollout engines and the trainer.

Shape-suffix legend (every letter used in opsd_mm/ and processors/):
    B  sequences in a batch (prompts x samples)     P  prompt width (left-padded); in a nested
    C  completion width (right-padded)                 list (``rollouts_P_G``), the prompts
    T  total width, T = P + C                       G  samples per prompt
    V  vocabulary size                              H  hidden size
    N  selected (masked-in) completion tokens       K  divergence support entries per token
    c  tokens of one chunk (the fused loss)            (V; the teacher's top k; or k + 1)
    S  per-token statistics rows (the fused loss)   W  processes (world size)
    D  vision patch features (a Qwen-VL tower)      M  reference image hashes (contamination)
    1, 2 ...  a literal size (``ids_N1`` is [N, 1]; ``both_2cV`` stacks two chunks)
A tensor named ``logits_BCV`` has shape [B, C, V]; a nested list ``rollouts_P_G`` is indexed
[prompt][sample]. ``width_P`` / ``width_C`` name the widths themselves.

Sequence layout shared by both sides of a pair (the alignment invariant):
    [pad ... pad | prompt tokens | completion tokens | pad ... pad]
     <------- width P -------->   <------- width C ------->
Prompts are left-padded to P and completions right-padded to C, so the completion occupies
columns P .. P+C-1 on the student side and on the teacher side alike, with no padding
between a prompt and its completion. The logits that predict completion token j sit at
column P - 1 + j.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from opsd_mm.errors import UserError

FinishReason = Literal["eos", "length"]


class BadImageError(UserError):
    """An image that cannot be used. ``source`` says where it came from (a path, or a short
    description such as ``<bytes: 812 B>``); ``reason`` says what is wrong with it. Raised by the
    VL processors; defined in the core so that the trainer can tell it from other prompt errors
    and honour ``processor.bad_image_policy=raise`` at run time."""

    kind = "image error"

    def __init__(self, example_id: str, source: str, reason: str):
        self.example_id = example_id
        self.source = source
        self.reason = reason
        super().__init__(
            f"example '{example_id}': bad image {source}: {reason}. Fix or drop the image, or set "
            "processor.bad_image_policy=skip to skip (and count) such examples."
        )


@dataclass(frozen=True)
class Region:
    """A box on one of an example's question images, which image views crop, zoom or mark.

    ``image`` indexes ``Example.images`` (0-based); ``box`` is (x0, y0, x1, y1), x to the
    right and y down, in pixels of the original image, or with ``normalized`` in fractions
    [0, 1] of its width and height. A box outside its image or without area is a bad image
    (``processor.bad_image_policy``), found when the processor checks the example."""

    image: int
    box: tuple[float, float, float, float]
    normalized: bool = False


@dataclass(frozen=True)
class Example:
    """One training or evaluation item.

    ``privileged`` is what only the teacher sees (a verified trace, a reference solution, or
    the answer); ``teacher_images`` are extra images only the teacher sees; ``regions`` are
    boxes on the question's images that the processor's image views read (the teacher's view
    may zoom into them, or mark them).
    """

    id: str
    question: str
    privileged: str = ""
    answer: str | None = None
    images: tuple[Any, ...] = ()
    teacher_images: tuple[Any, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    regions: tuple[Region, ...] = ()


def view_seed(seed: int, step: int, example_id: str) -> int:
    """The seed of an example's random student view at trainer step ``step`` (1-based) of a run
    seeded ``seed``: a stable 63-bit hash, so a resumed or multi-process run renders the same
    pixels. One per (step, example): every sample of the example shares the view."""
    import hashlib

    digest = hashlib.sha256(f"view|{seed}|{step}|{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Prompt:
    """A rendered prompt: token ids from one chat-template application.

    ``mm_inputs`` holds per-prompt tensors the model needs besides the ids (for Qwen-VL:
    ``pixel_values``, ``image_grid_thw``); ``token_type_ids`` is a per-token list when the model
    needs one (Qwen-VL's ``mm_token_type_ids``). ``images`` are the (resized) images an engine
    such as vLLM receives as multimodal data. ``text`` is the rendered text, for logs and
    prompt snapshots only - it is never re-tokenised.
    """

    input_ids: list[int]
    text: str = ""
    mm_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    token_type_ids: list[int] | None = None
    images: list[Any] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingConfig:
    """Sampling settings shared by every rollout engine (0 / 1.0 mean 'off')."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    seed: int | None = None


@dataclass
class Rollout:
    """One sampled completion. ``completion_ids`` ends with the EOS token when
    ``finish_reason == "eos"``; ``logprobs`` (engine-side, per sampled token) when available.
    ``weight_version``: the trainer step whose weights sampled it, from engines that sample
    from a copy of the weights (vLLM, the server); None from one that samples the live model."""

    completion_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = None
    weight_version: int | None = None


@dataclass
class Pair:
    """Student and teacher prompts that will both be followed by ``completion_ids``."""

    example_id: str
    student: Prompt
    teacher: Prompt
    completion_ids: list[int]
    # The rollout engine's log-probabilities of the completion tokens, when it reports them.
    logprobs: list[float] | None = None
    # The teacher's log-probabilities of the completion, scored on the generation server
    # (``teacher.scoring=server``); None when the teacher runs in the trainer.
    teacher_scores: TeacherScores | None = None


@dataclass
class TeacherScores:
    """One completion scored by the teacher outside the trainer (``teacher.scoring=server``).

    Per completion token j (the teacher's next-token distribution at the position that
    predicts it, full-vocabulary normalised, temperature 1): ``logprobs[j]`` = log p_t(y_j) of
    the token itself; with a top-k request, ``topk_ids[j]`` / ``topk_logprobs[j]`` the k most
    likely ids and their log-probabilities, most likely first (ties in the engine's order).
    """

    logprobs: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


@dataclass
class TeacherLogprobs:
    """:class:`TeacherScores` of a micro-batch's N loss tokens, as tensors the loss reads in
    place of a teacher forward: ``token_N`` = log p_t(y_n) (fp32); ``topk_ids_NK`` (long) and
    ``topk_NK`` (fp32) the teacher's top-k support, or None (sampled token only). Rows are
    taken in the order ``completion_ids_BC[mask_BC]`` takes them."""

    token_N: torch.Tensor
    topk_ids_NK: torch.Tensor | None = None
    topk_NK: torch.Tensor | None = None

    def __getitem__(self, index: slice) -> TeacherLogprobs:
        """Tokens ``index`` (a slice) of every field: one chunk of the fused loss."""
        return TeacherLogprobs(
            self.token_N[index],
            None if self.topk_ids_NK is None else self.topk_ids_NK[index],
            None if self.topk_NK is None else self.topk_NK[index],
        )

    def to(self, device: torch.device | str) -> TeacherLogprobs:
        return TeacherLogprobs(
            self.token_N.to(device),
            None if self.topk_ids_NK is None else self.topk_ids_NK.to(device),
            None if self.topk_NK is None else self.topk_NK.to(device),
        )


@dataclass
class SideBatch:
    """One side (student or teacher) of a collated batch, laid out as in the module docstring.

    ``model_inputs`` is exactly what the model's forward receives (input_ids, attention_mask,
    position_ids for text models; pixel_values, image_grid_thw, mm_token_type_ids for VL).
    """

    model_inputs: dict[str, torch.Tensor]
    prompt_width: int

    @property
    def input_ids_BT(self) -> torch.Tensor:
        return self.model_inputs["input_ids"]

    @property
    def attention_mask_BT(self) -> torch.Tensor:
        return self.model_inputs["attention_mask"]

    def to(self, device: torch.device | str) -> SideBatch:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.model_inputs.items()}
        return SideBatch(model_inputs=moved, prompt_width=self.prompt_width)


@dataclass
class PairBatch:
    """A collated batch of pairs. ``completion_mask_BC`` is 1 on real completion tokens
    (the loss's own skip-first-N is applied later, by the loss)."""

    student: SideBatch
    teacher: SideBatch
    completion_ids_BC: torch.Tensor
    completion_mask_BC: torch.Tensor
    example_ids: list[str]

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            student=self.student.to(device),
            teacher=self.teacher.to(device),
            completion_ids_BC=self.completion_ids_BC.to(device),
            completion_mask_BC=self.completion_mask_BC.to(device),
            example_ids=self.example_ids,
        )


class Processor(Protocol):
    """Turns examples into prompts and pairs into model inputs. Only processors know about
    chat templates, images and model families; the trainer sees this protocol alone.

    Everything the core calls is declared here and called directly (no probing). A processor
    without images implements the image hooks as no-ops: ``prepare_examples`` returns the
    examples unchanged, ``bad_images`` stays empty, ``step_context`` is a ``nullcontext()``
    (``processors/text.py``)."""

    pad_token_id: int
    eos_token_ids: list[int]
    suppress_token_ids: list[int]
    # Decodes completions for rendered samples (``opsd_mm.train.samples``): ``decode(ids, ...)``.
    tokenizer: Any
    # The errors of the examples the last ``prepare_examples`` dropped (policy ``skip``).
    bad_images: list[BadImageError]

    def prepare_examples(
        self, examples: Sequence[Example], data_dir: str | Path | None = None
    ) -> list[Example]:
        """Called once on the loaded data, before training: check every image under
        ``processor.bad_image_policy`` (raise at the first bad one, or drop its example and
        record the error in ``bad_images``); relative image paths resolve against
        ``data_dir``. Returns the kept examples."""
        ...

    def step_context(self, model: torch.nn.Module) -> AbstractContextManager[Any]:
        """Wraps one optimizer step's teacher and student forwards on ``model`` (the unwrapped
        student), e.g. to encode each image once for both sides."""
        ...

    def student_prompt(self, ex: Example, seed: int | None = None) -> Prompt:
        """The student's context. ``seed`` draws the random operations of the student's image
        view (:func:`view_seed`); without it they are left out (evaluation)."""
        ...

    def teacher_prompt(self, ex: Example) -> Prompt: ...

    def gain_prompt(self, ex: Example, seed: int | None = None) -> Prompt:
        """The teacher's context with the view the view gain compares the teacher's with
        (``processor.gain_view``; by default the student's, the same pixels as
        ``student_prompt(ex, seed)``). A processor without images returns
        ``teacher_prompt(ex)``."""
        ...

    def pair(
        self,
        ex: Example,
        completion_ids: Sequence[int],
        student: Prompt | None = None,
        teacher: Prompt | None = None,
    ) -> Pair:
        """Raises ValueError (naming the example) for a completion that must be rejected,
        e.g. one holding image tokens; the trainer counts and drops it."""
        ...

    def collate(self, pairs: Sequence[Pair]) -> PairBatch: ...
