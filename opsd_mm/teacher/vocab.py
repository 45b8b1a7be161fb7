"""The vocabulary check of a separate teacher: the student's token ids must mean the same to it.

Why: a model teacher scores the student's completion ids after its own rendering of the teacher
context, and the loss compares the two next-token distributions entry by entry, so id ``i``
must be the same token on both sides, and a special token (an EOS, an image pad) the same id.
Cross-tokenizer distillation (aligning two vocabularies) is not supported; a mismatch is
refused at start-up, before any weights load, naming the first difference.

Read here: the tokenizer files (``AutoTokenizer``) and ``config.json`` (``AutoConfig``), nothing
else. Compared: every token's id (the whole vocabulary, added tokens included), which added
tokens are special, and the ids of the special-token roles (bos, eos, pad, unk). The model's
embedding rows may differ (Qwen2.5-7B has 152,064, Qwen2.5-1.5B 151,936, on one tokenizer): the
rows past the tokenizer are padding no token maps to, so the loss compares the student's rows,
which the teacher must have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opsd_mm.errors import ConfigError

_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


class VocabularyMismatch(ConfigError):
    """The teacher's vocabulary is not the student's (one line naming the first difference)."""

    kind = "teacher vocabulary error"


@dataclass(frozen=True)
class VocabInfo:
    """What the loss needs to know about the two vocabularies: the tokenizer's size and the
    embedding rows of each model (``config.json``'s ``vocab_size``, text or VL layout)."""

    tokens: int
    student_rows: int
    teacher_rows: int


def _token_ids(tok: Any) -> dict[int, str]:
    return {i: t for t, i in tok.get_vocab().items()}


def _specials(tok: Any) -> dict[int, str]:
    return {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}


def _rows(config: Any) -> int:
    text = getattr(config, "text_config", None)
    return int(getattr(config, "vocab_size", None) or text.vocab_size)


def vocabulary_difference(student_tok: Any, teacher_tok: Any) -> str | None:
    """The first difference between two tokenizers, in words, or None when they agree on every
    token id, on which added tokens are special, and on the special-token roles."""
    s_ids, t_ids = _token_ids(student_tok), _token_ids(teacher_tok)
    for i in sorted(s_ids.keys() | t_ids.keys()):
        s, t = s_ids.get(i), t_ids.get(i)
        if s != t:
            if s is None:
                return f"id {i} is {t!r} in the teacher's tokenizer and no token in the student's"
            if t is None:
                return f"id {i} is {s!r} in the student's tokenizer and no token in the teacher's"
            return f"id {i} is {s!r} in the student's tokenizer and {t!r} in the teacher's"
    s_sp, t_sp = _specials(student_tok), _specials(teacher_tok)
    for i in sorted(s_sp.keys() ^ t_sp.keys()):
        who = "student" if i in s_sp else "teacher"
        token = s_sp.get(i) or t_sp.get(i)
        return f"{token!r} (id {i}) is a special token for the {who}'s tokenizer only"
    for role in _ROLES:
        s, t = getattr(student_tok, role, None), getattr(teacher_tok, role, None)
        if s != t:
            return (
                f"the {role.replace('_', ' ')} is {s!r} for the student and {t!r} for the teacher"
            )
    return None


def check_same_vocabulary(
    student_path: str,
    teacher_path: str,
    key: str,
    *,
    student_options: dict[str, Any] | None = None,
    teacher_options: dict[str, Any] | None = None,
) -> VocabInfo:
    """Refuse a teacher whose vocabulary differs from the student's, before any weights load:
    a :class:`VocabularyMismatch` naming ``key`` (``teacher.model.name_or_path``), both
    checkpoints and the first difference. ``*_options``: ``revision`` and
    ``trust_remote_code`` for the tokenizer and config loads."""
    from transformers import AutoConfig, AutoTokenizer

    s_opts, t_opts = student_options or {}, teacher_options or {}
    student_tok = AutoTokenizer.from_pretrained(student_path, **s_opts)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path, **t_opts)
    why = vocabulary_difference(student_tok, teacher_tok)
    if why is not None:
        raise VocabularyMismatch(
            f"{key}={teacher_path}: its vocabulary differs from the student's ({student_path}): "
            f"{why}. Cross-tokenizer distillation is not supported: the teacher scores the "
            "student's token ids, so both must have the same tokenizer (every token id and "
            "special token); choose a teacher of the student's model family"
        )
    info = VocabInfo(
        tokens=len(student_tok),
        student_rows=_rows(AutoConfig.from_pretrained(student_path, **s_opts)),
        teacher_rows=_rows(AutoConfig.from_pretrained(teacher_path, **t_opts)),
    )
    if info.teacher_rows < info.student_rows:
        raise VocabularyMismatch(
            f"{key}={teacher_path}: the teacher's embedding has {info.teacher_rows} rows, fewer "
            f"than the student's {info.student_rows}: the loss compares the student's whole "
            "output distribution, so the teacher needs at least the student's rows"
        )
    return info
