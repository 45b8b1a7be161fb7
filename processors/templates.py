"""Privileged-context templates: the user-message wording each side of a pair sees.

Why a registry of named, versioned strings: the wording is part of the method (the teacher's
distribution depends on it) and of every result, so a run records a template *name*, and a name
always means the same bytes. A published template is never edited; new wording gets a new name
(``opsd_teacher_v2``). Prompt snapshots in ``tests/snapshots`` fail if a wording drifts.

Templates are ``str.format`` strings over ``{question}``, ``{privileged}`` and ``{answer}``
(literal braces are doubled, as in ``\\boxed{{}}``). Each has a role: student templates may use
``{question}`` only, so privileged information can never leak into the student's context.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal

Role = Literal["student", "teacher"]

_BOXED = "Please reason step by step, and put your final answer within \\boxed{{}}."

# processor.teacher_template=same_as_student: the teacher sees the student's context exactly.
SAME_AS_STUDENT = "same_as_student"

# The OPSD reference implementation's transition instruction (arXiv 2601.18734; wording as in
# its data collator from the code revision of 2026-03-18 on), kept verbatim, including the em dash.
_OPSD_TRANSITION = (
    "After reading the reference solution above, make sure you truly understand the reasoning "
    "behind each step — do not copy or paraphrase it. Now, using your own words and independent "
    "reasoning, derive the same final answer to the problem above. Think step by step, explore "
    "different approaches, and don't be afraid to backtrack or reconsider if something doesn't "
    "work out:"
)

# The transition of the reference's first release (data_collator.py up to 2026-03-10; the
# configuration of its originally reported results), kept verbatim.
_OPSD_TRANSITION_RELEASE = (
    "After understanding the reference solution and the rationale behind each step, now "
    "articulate your own step-by-step reasoning that derives the same final answer to the problem "
    "below:"
)


@dataclass(frozen=True)
class PromptTemplate:
    """A named user-message template for one side of a pair."""

    name: str
    role: Role
    text: str
    description: str

    @property
    def fields(self) -> frozenset[str]:
        """The placeholders the text uses (``question``, ``privileged``, ``answer``)."""
        return frozenset(f for _, f, _, _ in string.Formatter().parse(self.text) if f)

    def render(self, question: str, privileged: str = "", answer: str | None = None) -> str:
        return self.text.format(question=question, privileged=privileged, answer=answer or "")


_TEMPLATES = (
    PromptTemplate(
        name="opsd_student_v1",
        role="student",
        text="Problem: {question}\n\n" + _BOXED,
        description="OPSD reference student message.",
    ),
    PromptTemplate(
        name="plain",
        role="student",
        text="{question}",
        description="The question verbatim (evaluation builds the whole user message itself).",
    ),
    PromptTemplate(
        name="opsd_teacher_v1",
        role="teacher",
        text=(
            "Problem: {question}\n\n"
            "Here is a reference solution to this problem:\n"
            "=== Reference Solution Begin ===\n{privileged}\n=== Reference Solution End ===\n"
            "\n\n" + _OPSD_TRANSITION + "\n\n" + _BOXED
        ),
        description="OPSD reference teacher message: reference solution plus transition.",
    ),
    PromptTemplate(
        name="opsd_teacher_v0",
        role="teacher",
        text=(
            "{question}\n\n"
            "Here is a reference solution to this problem:\n{privileged}\n"
            "\n\n" + _OPSD_TRANSITION_RELEASE + "\n\n" + _BOXED
        ),
        description=(
            "OPSD reference teacher message of its first release (the configuration behind its "
            "originally reported results): no 'Problem:' prefix, no solution markers, the milder "
            "transition. opsd_teacher_v1 is the later revision's wording."
        ),
    ),
    PromptTemplate(
        name="answer_only_v1",
        role="teacher",
        text=(
            "Problem: {question}\n\n"
            "The correct final answer to this problem is: {answer}\n\n"
            "Using your own independent reasoning, derive this answer step by step.\n\n" + _BOXED
        ),
        description="The teacher sees only the final answer (Example.answer), no solution.",
    ),
    PromptTemplate(
        name="question_only_v1",
        role="teacher",
        text="{question}",
        description=(
            "The question verbatim, nothing privileged in the text: for a teacher whose privilege "
            "is in the pixels (processor.teacher_view) or in teacher-only images."
        ),
    ),
    PromptTemplate(
        name="hint_v1",
        role="teacher",
        text="Problem: {question}\n\nHint: {privileged}\n\n" + _BOXED,
        description="The privileged text as a short hint.",
    ),
    PromptTemplate(
        name=SAME_AS_STUDENT,
        role="teacher",
        text="{question}",
        description=(
            "No privileged information: the teacher's context is exactly the student's (the "
            "processors render the student prompt, with the student template and thinking "
            "mode; this text is not used). Plain on-policy distillation from another model "
            "(teacher.kind=model); with the student's own weights, a KL to the initial model."
        ),
    ),
)

TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in _TEMPLATES}


def get_template(name: str, role: Role) -> PromptTemplate:
    """The template ``name`` for ``role``; errors name the config key and list the choices."""
    key = f"processor.{role}_template"
    choices = sorted(n for n, t in TEMPLATES.items() if t.role == role)
    template = TEMPLATES.get(name)
    if template is None:
        raise ValueError(f"{key}: unknown template '{name}'; available {role} templates: {choices}")
    if template.role != role:
        raise ValueError(
            f"{key}: '{name}' is a {template.role} template; available {role} templates: {choices}"
        )
    return template
