"""Qwen-VL processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): prompts with images, pairs, collation.

Why one class for three families: their prompts, image tokens and model inputs are the same
shape; what differs (the vision patch size) is data in :data:`FAMILIES`. The model computes its
own M-RoPE positions per side from that side's tokens, image grids and attention mask, so the
collated inputs carry ``mm_token_type_ids`` and the grids but no ``position_ids``.

Images: each is validated and converted to RGB (:mod:`.images`), resized with
``qwen_vl_utils.smart_resize`` between ``min_pixels`` and ``max_pixels`` (config, else the
model's image processor), and handed to the Hugging Face processor with ``do_resize=False``, so
the resized image a rollout engine receives (``Prompt.images``) is exactly what was encoded.
Images go where ``<image>`` / ``<image N>`` placeholders stand in the question (others before the
question text); teacher-only images go into the teacher prompt just before the privileged text
(:mod:`.vl_content`). The rules around rendering are the text processor's (:mod:`.base`); the
collated layout is :func:`.collate.pack_mm_side`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.types import Example, Pair, PairBatch, Prompt

from . import base
from .collate import pack_mm_side, pair_batch
from .images import BadImageError, load_example_images, load_image, resolve_source
from .templates import SAME_AS_STUDENT, PromptTemplate, get_template
from .text import TextProcessor
from .thinking import ThinkState, think_state
from .vision_cache import VisionCache
from .vl_content import content

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VLFamily:
    """What differs between Qwen-VL families, as far as prompts and inputs go."""

    patch_size: int  # the vision tower's patch; the checkpoint's image processor must agree


FAMILIES: dict[str, VLFamily] = {
    "qwen2_vl": VLFamily(patch_size=14),
    "qwen2_5_vl": VLFamily(patch_size=14),
    "qwen3_vl": VLFamily(patch_size=16),
}

_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


class QwenVLProcessor(base.ProcessorBase):
    """Processor for Qwen-VL models (see ``opsd_mm.types.Processor``).

    Token sets come from the text processor's rules (``eos_token_ids``, ``pad_token_id``,
    ``suppress_token_ids``: every special non-EOS token, which includes ``<|im_start|>`` and the
    vision start/end and image/video pad tokens, and the think tags the student's generation
    prompt rules out), so both processors reject the same completions. The think state of each
    role is read from this processor's own chat template (the Hugging Face processor's, which
    may differ from its tokenizer's), rendered once at start-up for a probe message.
    ``step_context(model)`` returns a :class:`VisionCache` (vision encoded once per step) when
    ``reuse_vision`` is on.
    """

    def __init__(
        self,
        hf_processor: Any,
        cfg: ProcessorConfig | None = None,
        family: str = "qwen2_5_vl",
        model_vocab_size: int | None = None,
        reuse_vision: bool = True,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"processor.kind: unknown VL family '{family}'; use {list(FAMILIES)}")
        self.cfg = cfg or ProcessorConfig()
        if self.cfg.student_prompt_format != "chat_template":
            raise ValueError(
                f"processor.student_prompt_format={self.cfg.student_prompt_format} is not "
                "supported for vision-language models (stripping special tokens would remove the "
                "vision start/end and image pad tokens the images are placed by); use "
                "chat_template"
            )
        self.family = family
        self.hf = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.reuse_vision = reuse_vision
        self.bad_images: list[BadImageError] = []  # filled by prepare_examples (policy skip)
        self.student_template: PromptTemplate = get_template(self.cfg.student_template, "student")
        self.teacher_template: PromptTemplate = get_template(self.cfg.teacher_template, "teacher")

        ip = hf_processor.image_processor
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        if self.patch_size != FAMILIES[family].patch_size:
            raise ValueError(
                f"{family}: the image processor's patch_size is {self.patch_size}, but this family's "
                f"vision tower uses {FAMILIES[family].patch_size}; fix preprocessor_config.json"
            )
        size = dict(getattr(ip, "size", None) or {})
        self.min_pixels: int = self.cfg.min_pixels or size.get("shortest_edge") or ip.min_pixels
        self.max_pixels: int = self.cfg.max_pixels or size.get("longest_edge") or ip.max_pixels

        think_states = (
            self._probe_think_state(self.cfg.student_thinking),
            self._probe_think_state(self.cfg.teacher_thinking),
        )
        text = TextProcessor(
            self.tokenizer, self.cfg, model_vocab_size=model_vocab_size, think_states=think_states
        )
        self._text = text
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in _VISION_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the Qwen-VL tokens {missing}")
        self.vision_start_id, self.vision_end_id, self.image_token_id, self.video_token_id = (
            vocab[t] for t in _VISION_TOKENS
        )
        self.vision_token_ids = frozenset(vocab[t] for t in _VISION_TOKENS)
        self._control_strings = base.control_strings(self.tokenizer)
        self.pad_token_id: int = text.pad_token_id
        self.eos_token_ids: list[int] = text.eos_token_ids
        # Never sampled: a new turn, or a vision token (the text rules already cover these when
        # they are special tokens; listed explicitly so no tokenizer variant can drop them).
        extra = set(self.vision_token_ids) | {vocab[t] for t in ("<|im_start|>",) if t in vocab}
        self.suppress_token_ids: list[int] = sorted(set(text.suppress_token_ids) | extra)
        self.student_think_state: ThinkState = text.student_think_state
        self.teacher_think_state: ThinkState = text.teacher_think_state

    def _probe_think_state(self, thinking: bool) -> ThinkState:
        """How this processor's chat template leaves the think block after a generation prompt
        (a one-text-part user message, rendered as prompts are)."""
        text = self.hf.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": base.THINK_PROBE}]}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        return think_state(text)

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        cfg: ProcessorConfig | None = None,
        family: str = "qwen2_5_vl",
        reuse_vision: bool = True,
    ) -> QwenVLProcessor:
        """Load the model's processor (tokenizer, image processor, chat template) from a local
        directory or hub id."""
        from transformers import AutoProcessor

        hf = AutoProcessor.from_pretrained(str(model_path))
        return cls(hf, cfg, family, base.model_vocab_size_of(model_path), reuse_vision=reuse_vision)

    def step_context(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Wrap one step's teacher and student forwards: each image is encoded once (the vision
        tower frozen); a no-op context when ``reuse_vision`` is off."""
        return VisionCache(model) if self.reuse_vision else contextlib.nullcontext()

    # ------------------------------------------------------------------------- images

    def prepare_examples(
        self, examples: Sequence[Example], data_dir: str | Path | None = None
    ) -> list[Example]:
        """Check every image of every example once, before training, under
        ``processor.bad_image_policy``: ``raise`` stops at the first bad image (naming the example
        and file); ``skip`` drops the example and records the error in ``self.bad_images``
        (logged with the example ids). Kept examples hold their original sources (relative
        paths made absolute against ``data_dir``), not decoded pixels, so memory stays bounded;
        images are decoded again when a prompt is built."""
        kept: list[Example] = []
        self.bad_images = []
        for ex in examples:
            ok = all(
                load_example_images(ex.id, sources, data_dir, self.cfg, self.bad_images.append)
                is not None
                for sources in (ex.images, ex.teacher_images)
            )
            if not ok:
                continue
            if data_dir is not None:
                ex = dataclasses.replace(
                    ex,
                    images=tuple(resolve_source(s, data_dir) for s in ex.images),
                    teacher_images=tuple(resolve_source(s, data_dir) for s in ex.teacher_images),
                )
            kept.append(ex)
        if self.bad_images:
            shown = ", ".join(
                f"{e.example_id} ({e.source}: {e.reason})" for e in self.bad_images[:10]
            )
            more = "" if len(self.bad_images) <= 10 else f" and {len(self.bad_images) - 10} more"
            log.warning(
                "skipped %d examples with bad images: %s%s", len(self.bad_images), shown, more
            )
        return kept

    def resize(self, image: Any, example_id: str) -> Any:
        """Validated RGB image resized with qwen_vl_utils' rule (sides multiples of
        patch * merge, pixels within [min_pixels, max_pixels])."""
        from PIL import Image
        from qwen_vl_utils import smart_resize

        img = load_image(image, example_id, max_image_pixels=self.cfg.max_image_pixels)
        h, w = smart_resize(
            img.height,
            img.width,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return img if (w, h) == img.size else img.resize((w, h), Image.Resampling.BICUBIC)

    # ------------------------------------------------------------------------- prompts

    def _render(
        self,
        ex: Example,
        role: str,
        privileged: str,
        thinking: bool,
        resized: list[Any] | None = None,
    ) -> tuple[str, dict[str, torch.Tensor], list[Any]]:
        """One chat-template application and one tokenisation -> (text, encoding, resized
        images). Pass ``resized`` to skip resizing again when only the text changed."""
        template = self.student_template if role == "student" else self.teacher_template
        parts, images = content(ex, template, privileged, teacher_images=role == "teacher")
        text = self.hf.apply_chat_template(
            [{"role": "user", "content": parts}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        if resized is None:
            resized = [self.resize(img, ex.id) for img in images]
        enc = self.hf(text=[text], images=resized or None, return_tensors="pt", do_resize=False)
        return text, dict(enc), resized

    def _make_prompt(
        self, ex: Example, role: str, text: str, enc: dict[str, torch.Tensor], resized: list[Any]
    ) -> Prompt:
        ids = enc["input_ids"][0].tolist()
        types = enc.get("mm_token_type_ids")
        token_types = types[0].tolist() if types is not None else self._token_types(ids)
        mm: dict[str, torch.Tensor] = {}
        if resized:
            mm = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        prompt = Prompt(
            input_ids=ids, text=text, mm_inputs=mm, token_type_ids=token_types, images=resized
        )
        template = self.student_template if role == "student" else self.teacher_template
        prompt.meta.update(
            template=template.name,
            n_images=len(resized),
            image_tokens=self.check_image_tokens(prompt, ex.id, role),
            **self._text.think_meta(ex, role, text),
        )
        return prompt

    def _token_types(self, ids: list[int]) -> list[int]:
        """mm_token_type_ids for processors that do not return them: 1 image, 2 video, 0 text."""
        return [
            1 if i == self.image_token_id else 2 if i == self.video_token_id else 0 for i in ids
        ]

    def check_image_tokens(self, prompt: Prompt, example_id: str, role: str) -> int:
        """Image-token count == vision-feature count (sum of t*h*w / merge**2), else a
        ValueError naming the example. Returns the count."""
        ids = torch.tensor(prompt.input_ids)
        n_tokens = int((ids == self.image_token_id).sum())
        n_video = int((ids == self.video_token_id).sum())
        grid = prompt.mm_inputs.get("image_grid_thw")
        n_feat = int((grid.prod(-1) // self.merge_size**2).sum()) if grid is not None else 0
        if n_tokens != n_feat or n_video:
            raise ValueError(
                f"example '{example_id}' ({role} prompt): {n_tokens} image tokens and {n_video} "
                f"video tokens but {n_feat} image features from image_grid_thw; the prompt and "
                "its images disagree"
            )
        pv = prompt.mm_inputs.get("pixel_values")
        n_rows = int(grid.prod(-1).sum()) if grid is not None else 0
        if (pv.shape[0] if pv is not None else 0) != n_rows:
            raise ValueError(
                f"example '{example_id}' ({role} prompt): pixel_values has "
                f"{0 if pv is None else pv.shape[0]} patch rows, image_grid_thw implies {n_rows}"
            )
        return n_tokens

    def student_prompt(self, ex: Example) -> Prompt:
        """The student's context: the question (with its images) in the student template."""
        base.check_text(ex, self._control_strings)
        text, enc, resized = self._render(ex, "student", "", self.cfg.student_thinking)
        base.check_length(
            ex.id,
            "student",
            enc["input_ids"].shape[1],
            "max_prompt_tokens",
            self.cfg.max_prompt_tokens,
            "raise the limit, lower processor.max_pixels, or drop the example",
            " (image tokens included)",
        )
        return self._make_prompt(ex, "student", text, enc, resized)

    def teacher_prompt(self, ex: Example) -> Prompt:
        """The teacher's context: question and images, teacher-only images, then the privileged
        text. Over ``processor.max_teacher_prompt_tokens`` the privileged text alone is cut at a
        token boundary of its own encoding (the whole prompt re-rendered until it fits);
        ``meta["privileged_truncated"]`` records it. ``processor.teacher_template=
        same_as_student``: exactly the student's context (its images only)."""
        if self.teacher_template.name == SAME_AS_STUDENT:
            return self.student_prompt(ex)
        base.check_text(ex, self._control_strings)
        template = self.teacher_template
        base.check_teacher_fields(ex, template)
        thinking = self.cfg.teacher_thinking
        resized: list[Any] | None = None

        def render(privileged: str) -> tuple[int, tuple[str, dict[str, torch.Tensor]]]:
            nonlocal resized  # images are resized once; only the text changes
            text, enc, resized = self._render(ex, "teacher", privileged, thinking, resized)
            return enc["input_ids"].shape[1], (text, enc)

        (text, enc), truncation = base.fit_privileged(
            ex,
            template,
            self.tokenizer,
            self.cfg.max_teacher_prompt_tokens,
            render,
            "raise the limit or lower processor.max_pixels",
        )
        prompt = self._make_prompt(ex, "teacher", text, enc, resized or [])
        prompt.meta.update(truncation)
        return prompt

    # ------------------------------------------------------------------------- pairs

    def check_completion(self, example_id: str, completion_ids: Sequence[int]) -> list[int]:
        """The completion as ints; a ValueError naming the example if it holds a vision token
        (it would break the re-forward's image-token count) or anything the text rules reject."""
        ids = [int(i) for i in completion_ids]
        bad = sorted({i for i in ids if i in self.vision_token_ids})
        if bad:
            names = self.tokenizer.convert_ids_to_tokens(bad)
            raise ValueError(
                f"example '{example_id}': completion contains image/vision tokens {names}; the "
                "rollout engine must suppress processor.suppress_token_ids"
            )
        return self._text.check_completion(example_id, ids)

    def collate(self, pairs: Sequence[Pair]) -> PairBatch:
        """Collate pairs: each side its own P, both the same C; M-RoPE left to the model."""
        if not pairs:
            raise ValueError("collate() got no pairs")
        for p in pairs:
            self.check_completion(p.example_id, p.completion_ids)
        completions = [p.completion_ids for p in pairs]
        width_C = max(len(c) for c in completions)
        sides = []
        for role in ("student", "teacher"):
            prompts = [getattr(p, role) for p in pairs]
            for pair, pr in zip(pairs, prompts):
                self.check_image_tokens(pr, pair.example_id, role)
            types = [
                pr.token_type_ids
                if pr.token_type_ids is not None
                else self._token_types(pr.input_ids)
                for pr in prompts
            ]
            sides.append(pack_mm_side(prompts, types, completions, width_C, self.pad_token_id))
        return pair_batch(pairs, sides[0], sides[1], self.pad_token_id)
