"""The prompt rules the text and vision-language processors share, written once.

Why pure functions and one thin base class: the two processors render prompts differently (token
ids from the tokenizer's chat template, or text plus images through the Hugging Face processor),
but the rules around the rendering are the same and must stay the same, so that both reject the
same data with the same message: no control-token strings in user text, a teacher template gets
the fields it needs, a prompt over its limit is an error naming the example, and only the
privileged text is ever cut to fit (:func:`fit_privileged`). :class:`ProcessorBase` adds only
``pair``, whose body is the same for every processor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from opsd_mm.types import Example, Pair, Prompt

from .templates import PromptTemplate

# The user message rendered once at start-up to see how the template ends a generation prompt.
THINK_PROBE = "x"

R = TypeVar("R")


def model_vocab_size_of(model_path: str | Path) -> int | None:
    """The model's embedding rows from config.json (text or VL layout), if present."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return raw.get("vocab_size") or raw.get("text_config", {}).get("vocab_size")


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """The text of every special added token, sorted: user data holding one would be encoded
    as the real control token."""
    return tuple(sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}))


def check_text(ex: Example, controls: Sequence[str]) -> None:
    """A ValueError naming the example and field if question, privileged text or answer holds a
    control-token string."""
    for field_name in ("question", "privileged", "answer"):
        value = getattr(ex, field_name) or ""
        for token in controls:
            if token in value:
                raise ValueError(
                    f"example '{ex.id}': {field_name} contains the control token {token!r}, "
                    "which would be encoded as a real control token; remove it from the data"
                )


def check_teacher_fields(ex: Example, template: PromptTemplate) -> None:
    """A ValueError naming the example if the teacher template needs an answer or privileged
    text that the example lacks."""
    if "answer" in template.fields and ex.answer is None:
        raise ValueError(
            f"example '{ex.id}': teacher template '{template.name}' needs an answer, but the "
            "example has none (set data.columns.answer or choose another "
            "processor.teacher_template)"
        )
    if "privileged" in template.fields and not ex.privileged.strip():
        raise ValueError(
            f"example '{ex.id}': teacher template '{template.name}' needs privileged text, "
            "but the example has none (set data.columns.privileged, or keep "
            "data.require_privileged=true to drop such rows)"
        )


def check_length(
    example_id: str, role: str, n: int, key: str, limit: int, advice: str, note: str = ""
) -> None:
    """A ValueError naming the example and the config key ``processor.<key>`` if a prompt of
    ``n`` tokens is over ``limit``; ``note`` follows the count, ``advice`` says what to do."""
    if n > limit:
        raise ValueError(
            f"example '{example_id}': {role} prompt has {n} tokens{note}, more than "
            f"processor.{key}={limit}; {advice}"
        )


def fit_privileged(
    ex: Example,
    template: PromptTemplate,
    tokenizer: Any,
    limit: int,
    render: Callable[[str], tuple[int, R]],
    advice: str,
) -> tuple[R, dict[str, Any]]:
    """Render the teacher prompt, cutting the privileged text alone until it fits ``limit``.

    ``render(privileged) -> (n_tokens, rendered)`` renders the whole prompt with the given
    privileged text. Over the limit, the privileged text is cut at a token boundary of its own
    encoding, by the number of tokens over, and the prompt rendered again, until it fits or no
    privileged text is left; the question is never cut. Returns the last rendering and the meta
    ``privileged_truncated`` (plus ``privileged_tokens`` and ``privileged_tokens_kept`` when
    cut); still over the limit, a ValueError naming the example, ending in ``advice``.
    """
    n, rendered = render(ex.privileged)
    n_priv = kept = None
    if n > limit and "privileged" in template.fields:
        enc = tokenizer(ex.privileged, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in enc["offset_mapping"]]
        n_priv = kept = len(starts)
        while n > limit and kept > 0:
            kept = max(0, kept - (n - limit))
            n, rendered = render(ex.privileged[: starts[kept]] if kept else "")
    how = " even with the privileged text removed" if kept == 0 else ""
    check_length(ex.id, "teacher", n, "max_teacher_prompt_tokens", limit, advice, how)
    meta: dict[str, Any] = {"privileged_truncated": n_priv is not None}
    if n_priv is not None:
        meta["privileged_tokens"] = n_priv
        meta["privileged_tokens_kept"] = kept
    return rendered, meta


class ProcessorBase:
    """``pair`` for every processor, from the subclass's own ``check_completion``,
    ``student_prompt`` and ``teacher_prompt``."""

    def pair(
        self,
        ex: Example,
        completion_ids: Sequence[int],
        student: Prompt | None = None,
        teacher: Prompt | None = None,
    ) -> Pair:
        """Both prompts for ``ex`` followed by the same completion, checked by the processor's
        own rules. Pass ``student`` (the prompt the rollout was sampled from) and ``teacher`` to
        reuse them across samples."""
        ids = self.check_completion(ex.id, completion_ids)
        return Pair(
            example_id=ex.id,
            student=student if student is not None else self.student_prompt(ex),
            teacher=teacher if teacher is not None else self.teacher_prompt(ex),
            completion_ids=ids,
        )
