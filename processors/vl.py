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
question text); teacher-only images go into the teacher prompt just before the privileged text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.types import Example, Pair, PairBatch, Prompt, SideBatch

from .images import BadImageError, load_example_images, load_image, resolve_source
from .templates import PromptTemplate, get_template
from .text import THINK_PROBE, TextProcessor, make_pair, model_vocab_size_of, pack_completions
from .thinking import ThinkState, think_state
from .vision_cache import VisionCache

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

# `<image>` takes the next unplaced image; `<image 2>` / `<image2>` takes the second image.
PLACEHOLDER = re.compile(r"<image(?:\s*(\d+))?>")
_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Private-use sentinels marking where the question / privileged text go in a rendered template.
_Q, _P = "\ue000question\ue000", "\ue000privileged\ue000"


def _merge_text(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent text parts joined, empty ones dropped (the chat template sees clean content)."""
    out: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "text":
            if not part["text"]:
                continue
            if out and out[-1]["type"] == "text":
                out[-1] = {"type": "text", "text": out[-1]["text"] + part["text"]}
                continue
        out.append(part)
    return out


class QwenVLProcessor:
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
        # Control-token strings in user data would be encoded as real control tokens.
        added = self.tokenizer.added_tokens_decoder.values()
        self._control_strings = tuple(sorted({t.content for t in added if t.special}))
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
            [{"role": "user", "content": [{"type": "text", "text": THINK_PROBE}]}],
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
        return cls(hf, cfg, family, model_vocab_size_of(model_path), reuse_vision=reuse_vision)

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

    def _question_parts(self, ex: Example) -> list[dict[str, Any]]:
        """Content parts of the question with image parts at the placeholders (each image part
        carries its source under ``"src"`` until rendering). Unreferenced images go first; a
        placeholder repeating an already placed image stays text.

        ``ex.meta["image_placeholders"] = False`` keeps the question verbatim with every image
        first - for benchmarks whose tags are text (MathVision's ``<image2>`` refers to a panel
        of its one composite image)."""
        parts: list[dict[str, Any]] = []
        placed: list[int] = []
        pos = 0
        matches = (
            PLACEHOLDER.finditer(ex.question) if ex.meta.get("image_placeholders", True) else ()
        )
        for m in matches:
            if m.group(1) is not None:
                idx = int(m.group(1)) - 1
                if not 0 <= idx < len(ex.images):
                    raise ValueError(
                        f"example '{ex.id}': question refers to {m.group(0)} but the example has "
                        f"{len(ex.images)} image(s)"
                    )
            else:
                idx = next((i for i in range(len(ex.images)) if i not in placed), -1)
                if idx < 0:
                    raise ValueError(
                        f"example '{ex.id}': question has more <image> placeholders than its "
                        f"{len(ex.images)} image(s)"
                    )
            if idx in placed:
                continue
            parts.append({"type": "text", "text": ex.question[pos : m.start()]})
            parts.append({"type": "image", "src": ex.images[idx]})
            placed.append(idx)
            pos = m.end()
        parts.append({"type": "text", "text": ex.question[pos:]})
        rest = [
            {"type": "image", "src": ex.images[i]} for i in range(len(ex.images)) if i not in placed
        ]
        return rest + parts

    def _content(
        self, ex: Example, template: PromptTemplate, privileged: str, teacher_images: bool
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """The user message's content parts and its images (source objects, in prompt order).

        The template is rendered with sentinels for ``{question}`` and ``{privileged}``, which
        are then replaced by the question's parts and by [teacher images, privileged text]
        (teacher images follow the question when the template has no ``{privileged}``).
        """
        if "question" not in template.fields:
            raise ValueError(f"template '{template.name}' has no {{question}}: images need a place")
        q_parts = self._question_parts(ex)
        t_parts = (
            [{"type": "image", "src": im} for im in ex.teacher_images] if teacher_images else []
        )
        rendered = template.render(question=_Q, privileged=_P, answer=ex.answer)
        has_p = _P in rendered
        parts: list[dict[str, Any]] = []
        for piece in re.split(f"({_Q}|{_P})", rendered):
            if piece == _Q:
                parts.extend(q_parts + ([] if has_p else t_parts))
            elif piece == _P:
                parts.extend(t_parts + [{"type": "text", "text": privileged}])
            else:
                parts.append({"type": "text", "text": piece})
        images = [p.pop("src") for p in parts if p["type"] == "image"]
        return _merge_text(parts), images

    # ------------------------------------------------------------------------- prompts

    def _check_text(self, ex: Example) -> None:
        for name in ("question", "privileged", "answer"):
            value = getattr(ex, name) or ""
            for token in self._control_strings:
                if token in value:
                    raise ValueError(
                        f"example '{ex.id}': {name} contains the control token {token!r}, which "
                        "would be encoded as a real control token; remove it from the data"
                    )

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
        parts, images = self._content(ex, template, privileged, teacher_images=role == "teacher")
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
        self._check_text(ex)
        text, enc, resized = self._render(ex, "student", "", self.cfg.student_thinking)
        n = enc["input_ids"].shape[1]
        if n > self.cfg.max_prompt_tokens:
            raise ValueError(
                f"example '{ex.id}': student prompt has {n} tokens (image tokens included), more "
                f"than processor.max_prompt_tokens={self.cfg.max_prompt_tokens}; raise the limit, "
                "lower processor.max_pixels, or drop the example"
            )
        return self._make_prompt(ex, "student", text, enc, resized)

    def teacher_prompt(self, ex: Example) -> Prompt:
        """The teacher's context: question and images, teacher-only images, then the privileged
        text. Over ``processor.max_teacher_prompt_tokens`` the privileged text alone is cut at a
        token boundary of its own encoding (the whole prompt re-rendered until it fits);
        ``meta["privileged_truncated"]`` records it."""
        self._check_text(ex)
        template = self.teacher_template
        limit = self.cfg.max_teacher_prompt_tokens
        if "answer" in template.fields and ex.answer is None:
            raise ValueError(
                f"example '{ex.id}': teacher template '{template.name}' needs an answer, but the "
                "example has none"
            )
        if "privileged" in template.fields and not ex.privileged.strip():
            raise ValueError(
                f"example '{ex.id}': teacher template '{template.name}' needs privileged text, "
                "but the example has none"
            )
        thinking = self.cfg.teacher_thinking
        privileged = ex.privileged
        text, enc, resized = self._render(ex, "teacher", privileged, thinking)
        n_priv = kept = None
        if enc["input_ids"].shape[1] > limit and "privileged" in template.fields:
            offsets = self.tokenizer(
                privileged, add_special_tokens=False, return_offsets_mapping=True
            )["offset_mapping"]
            starts = [start for start, _ in offsets]
            n_priv = kept = len(starts)
            while enc["input_ids"].shape[1] > limit and kept > 0:
                kept = max(0, kept - (enc["input_ids"].shape[1] - limit))
                privileged = ex.privileged[: starts[kept]] if kept < n_priv else ex.privileged
                text, enc, resized = self._render(ex, "teacher", privileged, thinking, resized)
        n = enc["input_ids"].shape[1]
        if n > limit:
            how = " even with the privileged text removed" if kept == 0 else ""
            raise ValueError(
                f"example '{ex.id}': teacher prompt has {n} tokens{how}, more than "
                f"processor.max_teacher_prompt_tokens={limit}; raise the limit or lower "
                "processor.max_pixels"
            )
        prompt = self._make_prompt(ex, "teacher", text, enc, resized)
        prompt.meta["privileged_truncated"] = n_priv is not None
        if n_priv is not None:
            prompt.meta["privileged_tokens"] = n_priv
            prompt.meta["privileged_tokens_kept"] = kept
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

    def pair(
        self,
        ex: Example,
        completion_ids: Sequence[int],
        student: Prompt | None = None,
        teacher: Prompt | None = None,
    ) -> Pair:
        """Both prompts for ``ex`` followed by the same completion. Pass ``student`` (the prompt
        the rollout was sampled from) and ``teacher`` to reuse them across samples."""
        return make_pair(self, ex, completion_ids, student, teacher)

    def _side(self, pairs: Sequence[Pair], role: str, width_C: int) -> SideBatch:
        """One side laid out as ``[pad | prompt | completion | pad]`` [B, P + C]; images of
        all rows concatenated in row order (the model walks the grids in that order)."""
        prompts = [getattr(p, role) for p in pairs]
        width_P = max(len(pr.input_ids) for pr in prompts)
        B, T = len(pairs), width_P + width_C
        input_ids_BT = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
        mm_types_BT = torch.zeros((B, T), dtype=torch.long)
        pixels, grids = [], []
        for b, (pair, pr) in enumerate(zip(pairs, prompts)):
            self.check_image_tokens(pr, pair.example_id, role)
            n, c = len(pr.input_ids), len(pair.completion_ids)
            types = (
                pr.token_type_ids
                if pr.token_type_ids is not None
                else self._token_types(pr.input_ids)
            )
            input_ids_BT[b, width_P - n : width_P] = torch.tensor(pr.input_ids)
            input_ids_BT[b, width_P : width_P + c] = torch.tensor(
                pair.completion_ids, dtype=torch.long
            )
            attention_mask_BT[b, width_P - n : width_P + c] = 1
            mm_types_BT[b, width_P - n : width_P] = torch.tensor(types)
            if "pixel_values" in pr.mm_inputs:
                pixels.append(pr.mm_inputs["pixel_values"])
                grids.append(pr.mm_inputs["image_grid_thw"])
        inputs = {
            "input_ids": input_ids_BT,
            "attention_mask": attention_mask_BT,
            "mm_token_type_ids": mm_types_BT,
        }
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels)
            inputs["image_grid_thw"] = torch.cat(grids)
        return SideBatch(model_inputs=inputs, prompt_width=width_P)

    def collate(self, pairs: Sequence[Pair]) -> PairBatch:
        """Collate pairs: each side its own P, both the same C; M-RoPE left to the model."""
        if not pairs:
            raise ValueError("collate() got no pairs")
        for p in pairs:
            self.check_completion(p.example_id, p.completion_ids)
        completions = [p.completion_ids for p in pairs]
        completion_ids_BC, completion_mask_BC = pack_completions(completions, self.pad_token_id)
        width_C = completion_ids_BC.shape[1]
        return PairBatch(
            student=self._side(pairs, "student", width_C),
            teacher=self._side(pairs, "teacher", width_C),
            completion_ids_BC=completion_ids_BC,
            completion_mask_BC=completion_mask_BC,
            example_ids=[p.example_id for p in pairs],
        )
