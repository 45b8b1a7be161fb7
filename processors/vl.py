"""Qwen-VL processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): prompts with images, pairs, collation.

Why one class for three families: their prompts, image tokens and model inputs are the same
shape; what differs (the vision patch size) is data in :data:`FAMILIES`. The model computes its
own M-RoPE positions per side from that side's tokens, image grids and attention mask, so the
collated inputs carry ``mm_token_type_ids`` and the grids but no ``position_ids``.

Images: each is validated and converted to RGB (:mod:`.images`), goes through its role's view
(``processor.student_view`` / ``teacher_view``, :mod:`.views`: crops, zooms, marks,
degradations; one image may become several), is resized with ``qwen_vl_utils.smart_resize``
between ``min_pixels`` and ``max_pixels`` (the view's ``resolution``, else config, else the
model's image processor), and is handed to the Hugging Face processor with ``do_resize=False``,
so the resized image a rollout engine receives (``Prompt.images``) is exactly what was encoded.
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

from . import base, views
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
        # Each role's view of the question images and the bounds of its final resize.
        self.views = {
            "student": list(self.cfg.student_view),
            "teacher": list(self.cfg.teacher_view),
        }
        if self.cfg.gain_view is not None:  # the view gain's own view (default: the student's)
            self.views["gain"] = list(self.cfg.gain_view)
        self.bounds = {
            role: views.bounds(ops, self.min_pixels, self.max_pixels)
            for role, ops in self.views.items()
        }
        self.uses_regions = any(views.uses_regions(ops) for ops in self.views.values())
        self.missing_regions = 0  # examples prepare_examples found without a region

        think_states = (
            self._probe_think_state(self.cfg.student_thinking),
            self._probe_think_state(self.cfg.teacher_thinking),
        )
        # The text rules only: the views are this processor's.
        text_cfg = dataclasses.replace(self.cfg, student_view=[], teacher_view=[], gain_view=None)
        text = TextProcessor(
            self.tokenizer, text_cfg, model_vocab_size=model_vocab_size, think_states=think_states
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
        (logged with the example ids). When a view reads regions, the example's boxes are
        checked against its images too (a box outside its image or without area is a bad
        image). Kept examples hold their original sources (relative paths made absolute against
        ``data_dir``), not decoded pixels, so memory stays bounded; images are decoded again
        when a prompt is built."""
        kept: list[Example] = []
        self.bad_images = []
        self.missing_regions = 0
        for ex in examples:
            loaded = []
            for sources in (ex.images, ex.teacher_images):
                images = load_example_images(
                    ex.id, sources, data_dir, self.cfg, self.bad_images.append
                )
                if images is None:
                    break
                loaded.append(images)
            if len(loaded) < 2 or not self._regions_ok(ex, loaded[0]):
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
        if self.missing_regions:
            log.warning(
                "%d of %d examples have no region: the views' crop, zoom and mark leave their "
                "images as they are (data.columns.regions)",
                self.missing_regions,
                len(examples),
            )
        return kept

    def _regions_ok(self, ex: Example, images: Sequence[Any]) -> bool:
        """The example's regions fit its images (only checked when a view reads them); a bad
        box follows ``processor.bad_image_policy`` like a bad image."""
        if not self.uses_regions:
            return True
        if not ex.regions and ex.images:
            self.missing_regions += 1
            return True
        try:
            views.region_boxes(ex, [im.size for im in images])
        except BadImageError as err:
            if self.cfg.bad_image_policy == "raise":
                raise
            self.bad_images.append(err)
            return False
        return True

    def resize(self, image: Any, example_id: str, bounds: tuple[int, int] | None = None) -> Any:
        """Validated RGB image resized with qwen_vl_utils' rule (sides multiples of
        patch * merge, pixels within ``bounds``, by default [min_pixels, max_pixels])."""
        return self.fit(self.load(image, example_id), bounds)

    def load(self, image: Any, example_id: str) -> Any:
        """A validated RGB image (:func:`.images.load_image`)."""
        return load_image(image, example_id, max_image_pixels=self.cfg.max_image_pixels)

    def fit(self, img: Any, bounds: tuple[int, int] | None = None) -> Any:
        """``img`` resized with qwen_vl_utils' rule within ``bounds`` (min, max pixels)."""
        from PIL import Image
        from qwen_vl_utils import smart_resize

        lo, hi = bounds or (self.min_pixels, self.max_pixels)
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(img.height, img.width, factor=factor, min_pixels=lo, max_pixels=hi)
        # smart_resize floors a side to 0 when max_pixels leaves less than one factor for it
        # (a view's low resolution); one merged patch is the least an image can be.
        h, w = max(h, factor), max(w, factor)
        return img if (w, h) == img.size else img.resize((w, h), Image.Resampling.BICUBIC)

    def _image_groups(
        self, ex: Example, parts: list[dict[str, Any]], view: str, seed: int | None
    ) -> list[list[Any]]:
        """Per image part of a message (in order), the final images it stands for: a question
        image through the ``view`` role's view (one or more images), a teacher-only image
        resized within the teacher's bounds."""
        slots = [p["slot"] for p in parts if p["type"] == "image"]
        viewed: list[list[Any]] = []
        if any(kind == "question" for kind, _ in slots):
            loaded = [self.load(src, ex.id) for src in ex.images]
            lo, hi = self.bounds[view]
            groups = views.view_images(ex, loaded, self.views[view], seed, hi)
            viewed = [[self.fit(im, (lo, hi)) for im in group] for group in groups]
        teacher_bounds = self.bounds["teacher"]
        return [
            viewed[i]
            if kind == "question"
            else [self.resize(ex.teacher_images[i], ex.id, teacher_bounds)]
            for kind, i in slots
        ]

    # ------------------------------------------------------------------------- prompts

    def _render(
        self,
        ex: Example,
        role: str,
        privileged: str,
        thinking: bool,
        groups: list[list[Any]] | None = None,
        view: str | None = None,
        seed: int | None = None,
    ) -> tuple[str, dict[str, torch.Tensor], list[list[Any]]]:
        """One chat-template application and one tokenisation -> (text, encoding, the final
        images of each image part). The ``role``'s template with the ``view`` role's view of the
        images (default: its own). Pass ``groups`` to skip the images when only the text
        changed."""
        template = self.student_template if role == "student" else self.teacher_template
        parts, _ = content(ex, template, privileged, teacher_images=role == "teacher")
        if groups is None:
            groups = self._image_groups(ex, parts, view or role, seed)
        message, images, it = [], [], iter(groups)
        for part in parts:
            if part["type"] != "image":
                message.append(part)
                continue
            group = next(it)
            message += [{"type": "image"}] * len(group)
            images += group
        text = self.hf.apply_chat_template(
            [{"role": "user", "content": message}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        enc = self.hf(text=[text], images=images or None, return_tensors="pt", do_resize=False)
        return text, dict(enc), groups

    def _make_prompt(
        self,
        ex: Example,
        role: str,
        text: str,
        enc: dict[str, torch.Tensor],
        groups: list[list[Any]],
        view: str | None = None,
    ) -> Prompt:
        resized = [im for group in groups for im in group]
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
            view=view or role,
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

    def student_prompt(self, ex: Example, seed: int | None = None) -> Prompt:
        """The student's context: the question (with its images in the student's view) in the
        student template. ``seed`` draws the view's random operations (the trainer passes
        :func:`opsd_mm.types.view_seed` of the step and example; ``meta["view_seed"]``
        records it); without it they are left out."""
        base.check_text(ex, self._control_strings)
        text, enc, groups = self._render(ex, "student", "", self.cfg.student_thinking, seed=seed)
        base.check_length(
            ex.id,
            "student",
            enc["input_ids"].shape[1],
            "max_prompt_tokens",
            self.cfg.max_prompt_tokens,
            "raise the limit, lower processor.max_pixels, or drop the example",
            " (image tokens included)",
        )
        prompt = self._make_prompt(ex, "student", text, enc, groups)
        if seed is not None:
            prompt.meta["view_seed"] = seed
        return prompt

    def teacher_prompt(self, ex: Example) -> Prompt:
        """The teacher's context: question and images (in the teacher's view), teacher-only
        images, then the privileged text. Over ``processor.max_teacher_prompt_tokens`` the
        privileged text alone is cut at a token boundary of its own encoding (the whole prompt
        re-rendered until it fits); ``meta["privileged_truncated"]`` records it.
        ``processor.teacher_template=same_as_student``: exactly the student's context (its
        images only, in the student's view)."""
        if self.teacher_template.name == SAME_AS_STUDENT:
            return self.student_prompt(ex)
        return self._teacher(ex, "teacher", None)

    def gain_prompt(self, ex: Example, seed: int | None = None) -> Prompt:
        """The teacher's context (template, teacher-only images, privileged text) with the view
        the view gain compares the teacher's with: ``processor.gain_view``, by default the
        student's view of the question images (the same pixels as ``student_prompt(ex,
        seed)``). The view gain compares the teacher's scores in this context with its own."""
        return self._teacher(ex, "gain" if "gain" in self.views else "student", seed)

    def _teacher(self, ex: Example, view: str, seed: int | None) -> Prompt:
        base.check_text(ex, self._control_strings)
        template = self.teacher_template
        base.check_teacher_fields(ex, template)
        thinking = self.cfg.teacher_thinking
        groups: list[list[Any]] | None = None

        def render(privileged: str) -> tuple[int, tuple[str, dict[str, torch.Tensor]]]:
            nonlocal groups  # images are viewed and resized once; only the text changes
            text, enc, groups = self._render(
                ex, "teacher", privileged, thinking, groups, view, seed
            )
            return enc["input_ids"].shape[1], (text, enc)

        (text, enc), truncation = base.fit_privileged(
            ex,
            template,
            self.tokenizer,
            self.cfg.max_teacher_prompt_tokens,
            render,
            "raise the limit or lower processor.max_pixels",
        )
        prompt = self._make_prompt(ex, "teacher", text, enc, groups or [], view)
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
