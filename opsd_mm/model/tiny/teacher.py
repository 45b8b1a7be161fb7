"""Tiny teachers: a 4-layer model on the tiny student's tokenizer, warm-started so it differs.

``tiny:text-teacher`` (and ``tiny:qwen2-vl-teacher``, ``tiny:qwen2.5-vl-teacher``,
``tiny:qwen3-vl-teacher``) is the "bigger model of the same family" of ``teacher.kind=model``
at tiny scale: the architecture of the matching 2-layer tiny student with twice the layers, the
same tokenizer and chat template (so the vocabulary check passes and every completion id means
the same token to both), its own weights.

Warm start: weights drawn from another seed, then :data:`WARM_STEPS` causal language-model
steps on the tiny corpus the tokenizer was trained on (arithmetic traces, sentences, LaTeX;
:func:`~opsd_mm.model.tiny.text.tiny_corpus`). Why steps rather than perturbed weights: a
perturbed random model is still random - its next-token distributions are near-uniform noise,
as the random student's are, so a loss computed between the two would hardly depend on which
model is which. After the steps the teacher puts real mass on the corpus's tokens (its loss on
the corpus drops from ln V ~ 7.3 to about 3.5; recorded in ``tiny_teacher.json`` beside the
weights): it differs from the student the way a trained teacher does. The steps take about a
second on a CPU, once, when the model is first built.
"""

from __future__ import annotations

from pathlib import Path

TEACHER_LAYERS = 4
TEACHER_WEIGHT_SEED = 1
WARM_STEPS = 40


def build_tiny_teacher(out_dir: str | Path, student: str) -> Path:
    """The tiny teacher of the tiny student ``student`` (``text`` or a VL family) into
    ``out_dir``: built by the student's own builder with 4 layers, another weight seed and the
    warm start; ``tiny_teacher.json`` records the warm start's first and last loss."""
    out_dir = Path(out_dir)
    kwargs = dict(num_layers=TEACHER_LAYERS, weight_seed=TEACHER_WEIGHT_SEED, warm_steps=WARM_STEPS)
    if student == "text":
        from opsd_mm.model.tiny.text import build_tiny_text

        build_tiny_text(out_dir, **kwargs)
    else:
        from opsd_mm.model.tiny.vl import build_tiny_vl

        build_tiny_vl(out_dir, family=student, **kwargs)
    return out_dir
