"""Text processor: chat-template prompts for both sides of a pair, and their collation.

Why the care over ids: OPSD scores the student's exact completion tokens under two contexts,
so every prompt is token ids from one chat-template application (never decoded text encoded
again, which can re-segment tokens), and collation lays both sides out as in
``opsd_mm.types`` (left-padded prompt | completion | right padding; :mod:`.collate`), so
completion token j sits at column P + j on each side, and the logits that predict it at column
P - 1 + j. The rules around rendering (control tokens in data, teacher fields, prompt limits,
privileged-text truncation, ``pair``) are shared with the VL processor (:mod:`.base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.types import BadImageError, Example, Pair, PairBatch, Prompt, SideBatch

from . import base
from .collate import pack_side, pair_batch
from .templates import SAME_AS_STUDENT, PromptTemplate, get_template
from .thinking import THINK_CLOSE, THINK_OPEN, ThinkState, think_state, think_tags_to_suppress

# Chat-end tokens that stop a ChatML turn; Qwen3 generation configs list both.
_EOS_CANDIDATES = ("<|im_end|>", "<|endoftext|>")


def strip_special_tokens(text: str, specials: Sequence[str]) -> str:
    """``text`` with every occurrence of each string in ``specials`` removed (longest first, so a
    special token containing another is removed whole).

    For a byte-level BPE tokenizer this equals decoding the text's ids with
    ``skip_special_tokens=True``: special added tokens vanish, every other token (non-special
    added tokens such as ``<think>`` included) decodes to its exact text.
    """
    for token in sorted(specials, key=len, reverse=True):
        text = text.replace(token, "")
    return text


class TextProcessor(base.ProcessorBase):
    """Processor for chat-template text models (see ``opsd_mm.types.Processor``).

    Token sets, and why:

    - ``eos_token_ids``: the tokenizer's EOS plus ``<|im_end|>`` and ``<|endoftext|>`` when the
      vocabulary has them (Qwen3's generation config stops on both).
    - ``suppress_token_ids``: ids a rollout must never sample. Every *special* added token that
      is not an EOS (``<|im_start|>`` - a new turn inside a completion; the vision and image/video
      pad tokens - a sampled ``<|image_pad|>`` breaks the VL re-forward; FIM and box tokens of
      real Qwen vocabularies); the think tags the student's generation prompt rules out
      (:mod:`.thinking`: ``<think>`` after an open block, both after a closed one, both when
      neither and the student's thinking is off); and the model's extra embedding rows beyond
      the tokenizer (real Qwen checkpoints pad the vocabulary; random tiny models sample them).
      ``<|endoftext|>`` is NOT suppressed although it is the pad token: it is an EOS, and
      completions are masked by length, never by ``id != pad``.

    The think state of each role (``student_think_state``, ``teacher_think_state``) comes from
    rendering a probe message with that role's thinking flag at start-up (or is passed in as
    ``think_states`` by a processor that renders with its own chat template); every prompt is
    checked against it, so the suppress list the rollout engine read stays right.

    ``pair`` rejects completions holding a suppressed id, an id outside the tokenizer, or an
    EOS before the last position (a sign of un-stripped engine padding).

    ``processor.student_prompt_format=specials_stripped`` tokenises the student prompt as the
    OPSD reference did (see ``student_prompt``).
    """

    def __init__(
        self,
        tokenizer: Any,
        cfg: ProcessorConfig | None = None,
        model_vocab_size: int | None = None,
        think_states: tuple[ThinkState, ThinkState] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg or ProcessorConfig()
        views = {
            "student_view": self.cfg.student_view,
            "teacher_view": self.cfg.teacher_view,
            "gain_view": self.cfg.gain_view,
        }
        if any(views.values()):
            key = next(k for k, v in views.items() if v)
            raise ValueError(
                f"processor.{key}: image views need a vision-language model; this one is "
                "text-only (set processor.kind to its VL family, or drop the view)"
            )
        self.bad_images: list[BadImageError] = []  # no images: never filled
        self.student_template: PromptTemplate = get_template(self.cfg.student_template, "student")
        self.teacher_template: PromptTemplate = get_template(self.cfg.teacher_template, "teacher")
        self.vocab_size = len(tokenizer)

        vocab = tokenizer.get_vocab()
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        eos += [vocab[t] for t in _EOS_CANDIDATES if t in vocab]
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        if not self.eos_token_ids:
            raise ValueError(
                "the tokenizer has no EOS token (eos_token, <|im_end|>, <|endoftext|>)"
            )
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else self.eos_token_ids[0]

        special = [i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special]
        self._control_strings = base.control_strings(tokenizer)
        suppress = {i for i in special if i not in self.eos_token_ids}
        if think_states is None:
            think_states = (
                think_state(self._render_text(base.THINK_PROBE, self.cfg.student_thinking)),
                think_state(self._render_text(base.THINK_PROBE, self.cfg.teacher_thinking)),
            )
        self.student_think_state: ThinkState = think_states[0]
        self.teacher_think_state: ThinkState = think_states[1]
        # Rollouts are sampled after the student prompt: its think block decides.
        tags = think_tags_to_suppress(self.student_think_state, self.cfg.student_thinking)
        suppress |= {vocab[t] for t in tags if t in vocab}
        if model_vocab_size is not None and model_vocab_size > self.vocab_size:
            suppress |= set(range(self.vocab_size, model_vocab_size))
        self.suppress_token_ids: list[int] = sorted(suppress)
        self._suppress_set = frozenset(suppress)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, cfg: ProcessorConfig) -> TextProcessor:
        """Load the tokenizer from a local directory (and the model's vocabulary size from its
        config.json, to suppress embedding rows the tokenizer has no token for)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        return cls(tokenizer, cfg, model_vocab_size=base.model_vocab_size_of(model_path))

    def prepare_examples(
        self, examples: Sequence[Example], data_dir: str | Path | None = None
    ) -> list[Example]:
        """No images to check: the examples, unchanged (``opsd_mm.types.Processor``)."""
        return list(examples)

    def step_context(self, model: torch.nn.Module) -> AbstractContextManager[Any]:
        """Nothing to share between a step's forwards: a no-op context."""
        return nullcontext()

    # ------------------------------------------------------------------------- prompts

    def _render_ids(self, content: str, thinking: bool) -> list[int]:
        """Token ids of a one-user-message chat with the generation prompt, from one template
        application (tokenize=True; transformers 5 returns a BatchEncoding)."""
        out = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            enable_thinking=thinking,
            tokenize=True,
            return_dict=True,
        )
        return list(out["input_ids"])

    def _render_text(self, content: str, thinking: bool) -> str:
        """The same template as text, for logs and snapshots only (never re-tokenised)."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            enable_thinking=thinking,
            tokenize=False,
        )

    def think_meta(self, ex: Example, role: str, text: str) -> dict[str, Any]:
        """``{"think_state": ...}`` for a rendered prompt, or a ValueError naming the example if
        it differs from the state found at start-up (which set ``suppress_token_ids``)."""
        state = think_state(text)
        expected = self.student_think_state if role == "student" else self.teacher_think_state
        if state != expected:
            raise ValueError(
                f"example '{ex.id}': the {role} prompt's think block is '{state}', but the chat "
                f"template's probe prompt gave '{expected}' (processor.suppress_token_ids was "
                "set from it); the template must end every generation prompt the same way"
            )
        return {"think_state": state}

    def student_prompt(self, ex: Example, seed: int | None = None) -> Prompt:
        """The student's context: the question in the student template, nothing privileged.
        (``seed`` draws an image view's random operations; text has none.)

        ``processor.student_prompt_format``:

        - ``chat_template`` (default): the ids of one chat-template application.
        - ``specials_stripped``: the OPSD reference's documented quirk, which produced its
          reported results: the chat-template text with every *special* added token removed
          (the reference decodes the template ids with ``skip_special_tokens=True``), tokenised
          again as plain text without special tokens. The student sees
          ``user\\n<message>\\nassistant\\n`` (plus whatever non-special text the template adds,
          such as ``<think>`` tags or a default system message, minus its special tokens). The
          teacher prompt is unaffected.
        """
        base.check_text(ex, self._control_strings)
        content = self.student_template.render(question=ex.question)
        thinking = self.cfg.student_thinking
        text = self._render_text(content, thinking)
        meta: dict[str, Any] = {"template": self.student_template.name}
        if self.cfg.student_prompt_format == "specials_stripped":
            # What this does to the ids: every <|im_start|> / <|im_end|> (and any other special
            # token) id disappears, and the text between them is encoded again, so tokens can
            # now span the old boundaries: the message's final "." and the "\n" that followed
            # <|im_end|> become one ".\n" token with Qwen's pre-tokenizer. The ids are therefore
            # not the chat-template ids minus the special ones. A deliberate re-encode, made
            # here only (the student's default and the teacher stay one template application).
            text = strip_special_tokens(text, self._control_strings)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            meta["student_prompt_format"] = "specials_stripped"
        else:
            ids = self._render_ids(content, thinking)
        base.check_length(
            ex.id,
            "student",
            len(ids),
            "max_prompt_tokens",
            self.cfg.max_prompt_tokens,
            "raise the limit or drop the example",
        )
        meta.update(self.think_meta(ex, "student", text))
        return Prompt(input_ids=ids, text=text, meta=meta)

    def teacher_prompt(self, ex: Example) -> Prompt:
        """The teacher's context: question plus privileged text in the teacher template.

        Over ``processor.max_teacher_prompt_tokens``, the privileged text alone is cut (at a
        token boundary of the privileged text, then the whole prompt re-rendered, shrinking until
        it fits); the question is never cut. ``meta["privileged_truncated"]`` records it.
        ``processor.teacher_template=same_as_student``: exactly the student's context.
        """
        if self.teacher_template.name == SAME_AS_STUDENT:
            return self.student_prompt(ex)
        base.check_text(ex, self._control_strings)
        template = self.teacher_template
        base.check_teacher_fields(ex, template)
        thinking = self.cfg.teacher_thinking

        def render(privileged: str) -> tuple[int, tuple[str, list[int]]]:
            content = template.render(ex.question, privileged, ex.answer)
            ids = self._render_ids(content, thinking)
            return len(ids), (content, ids)

        (content, ids), truncation = base.fit_privileged(
            ex,
            template,
            self.tokenizer,
            self.cfg.max_teacher_prompt_tokens,
            render,
            "the question is never truncated: raise the limit or drop the example",
        )
        meta: dict[str, Any] = {"template": template.name, **truncation}
        text = self._render_text(content, thinking)
        meta.update(self.think_meta(ex, "teacher", text))
        return Prompt(input_ids=ids, text=text, meta=meta)

    def gain_prompt(self, ex: Example, seed: int | None = None) -> Prompt:
        """Without images every view is the teacher's: ``teacher_prompt(ex)``."""
        return self.teacher_prompt(ex)

    # ------------------------------------------------------------------------- pairs

    def check_completion(self, example_id: str, completion_ids: Sequence[int]) -> list[int]:
        """The completion as a list of ints, or a ValueError naming the example."""
        ids = [int(i) for i in completion_ids]
        if not ids:
            raise ValueError(f"example '{example_id}': empty completion")
        for j, tok in enumerate(ids):
            if not 0 <= tok < self.vocab_size:
                raise ValueError(
                    f"example '{example_id}': completion token {j} is id {tok}, outside the "
                    f"tokenizer's {self.vocab_size} ids (mask the model's extra rows in sampling)"
                )
            if tok in self._suppress_set:
                name = self.tokenizer.convert_ids_to_tokens(tok)
                why = (
                    f" (the student's generation prompt leaves its think block "
                    f"'{self.student_think_state}', processor.student_thinking="
                    f"{str(self.cfg.student_thinking).lower()})"
                    if name in (THINK_OPEN, THINK_CLOSE)
                    else ""
                )
                raise ValueError(
                    f"example '{example_id}': completion token {j} is the suppressed id {tok} "
                    f"({name!r}){why}; the rollout engine must suppress "
                    "processor.suppress_token_ids"
                )
            if tok in self.eos_token_ids and j != len(ids) - 1:
                raise ValueError(
                    f"example '{example_id}': EOS id {tok} at completion token {j} before the "
                    "end; the rollout engine must cut completions after their first EOS"
                )
        return ids

    def collate(self, pairs: Sequence[Pair]) -> PairBatch:
        """Collate pairs into the shared layout; each side has its own P, both the same C."""
        if not pairs:
            raise ValueError("collate() got no pairs")
        for p in pairs:
            if p.student.mm_inputs or p.teacher.mm_inputs:
                raise ValueError(
                    f"example '{p.example_id}': prompt has image inputs; the text processor "
                    "cannot collate them (set processor.kind to the model's VL family)"
                )
        completions_B = [p.completion_ids for p in pairs]
        sides = []
        for side in ("student", "teacher"):
            prompts_B = [getattr(p, side).input_ids for p in pairs]
            model_inputs, P = pack_side(prompts_B, completions_B, self.pad_token_id)
            sides.append(SideBatch(model_inputs=model_inputs, prompt_width=P))
        return pair_batch(pairs, sides[0], sides[1], self.pad_token_id)
