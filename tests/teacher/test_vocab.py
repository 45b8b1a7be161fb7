"""The model teacher's vocabulary check: refused before any weights load, naming the first
difference; the tiny teachers share the tiny students' tokenizers."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from opsd_mm.cli import main
from opsd_mm.teacher.vocab import VocabularyMismatch, check_same_vocabulary, vocabulary_difference

from .conftest import TINY_TEXT


def _without_weights(src, dst):
    """A checkpoint directory holding the tokenizer and config only: loading its weights fails."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    return dst


def test_the_tiny_teachers_share_the_students_tokenizers(tiny_cache):
    from opsd_mm.model.tiny import STUDENT_NAMES, resolve_tiny

    for name in ("text", "qwen2.5-vl"):
        assert name in STUDENT_NAMES
        student, teacher = (
            resolve_tiny(name, tiny_cache),
            resolve_tiny(f"{name}-teacher", tiny_cache),
        )
        info = check_same_vocabulary(str(student), str(teacher), "k")
        assert info.student_rows == info.teacher_rows >= info.tokens


def test_differences_are_named():
    from opsd_mm.model.tiny.text import train_tiny_tokenizer

    base = train_tiny_tokenizer(0)
    assert vocabulary_difference(base, train_tiny_tokenizer(0)) is None
    extra = train_tiny_tokenizer(0)
    extra.add_tokens(["<extra>"])
    assert vocabulary_difference(base, extra) == (
        f"id {len(base)} is '<extra>' in the teacher's tokenizer and no token in the student's"
    )
    assert "in the student's tokenizer and no token in the teacher's" in vocabulary_difference(
        extra, base
    )
    special = train_tiny_tokenizer(0)
    special.add_special_tokens({"additional_special_tokens": ["<think>"]})  # was not special
    assert "'<think>' (id 3) is a special token for the teacher's tokenizer only" == (
        vocabulary_difference(base, special)
    )
    eos = train_tiny_tokenizer(0)
    eos.eos_token = "<|endoftext|>"
    assert vocabulary_difference(base, eos) == (
        "the eos token is '<|im_end|>' for the student and '<|endoftext|>' for the teacher"
    )


def _train(tmp_path, tiny_cache, student, teacher, capsys):
    rc = main(
        [
            "train",
            str(TINY_TEXT),
            f"run_dir={tmp_path / 'run'}",
            f"model.name_or_path={student}",
            f"model.tiny_cache_dir={tiny_cache}",
            "teacher.kind=model",
            f"teacher.model.name_or_path={teacher}",
            "logging.progress=false",
        ]
    )
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_vocabulary_mismatch_is_refused_before_any_weights_load(
    tiny_text_dir, tiny_teacher_dir, tiny_cache, tmp_path, capsys
):
    """Neither checkpoint has weights: had either loaded first, this would be a missing-weights
    error. The command exits 2 with one line naming the key, the first difference and that
    cross-tokenizer distillation is not supported."""
    student = _without_weights(tiny_text_dir, tmp_path / "student")
    teacher = _without_weights(tiny_teacher_dir, tmp_path / "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(teacher)
    rc, err = _train(tmp_path, tiny_cache, student, teacher, capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"teacher vocabulary error: teacher.model.name_or_path={teacher}:")
    assert f"id {len(tok) - 1} is '<extra>' in the teacher's tokenizer" in err[0]
    assert "Cross-tokenizer distillation is not supported" in err[0]
    # With the teacher's tokenizer restored the same directories get past the check, to the
    # first weight load (the student's), which fails: nothing was loaded before the check.
    shutil.copy(tiny_teacher_dir / "tokenizer.json", teacher / "tokenizer.json")
    shutil.copy(tiny_teacher_dir / "tokenizer_config.json", teacher / "tokenizer_config.json")
    with pytest.raises(OSError, match="model.safetensors|weights|no file"):
        main(
            [
                "train",
                str(TINY_TEXT),
                f"run_dir={tmp_path / 'run2'}",
                f"model.name_or_path={student}",
                "teacher.kind=model",
                f"teacher.model.name_or_path={teacher}",
                "logging.progress=false",
            ]
        )


def test_a_teacher_with_fewer_embedding_rows_is_refused(tiny_text_dir, tiny_teacher_dir, tmp_path):
    teacher = _without_weights(tiny_teacher_dir, tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config["vocab_size"] -= 64
    (teacher / "config.json").write_text(json.dumps(config))
    with pytest.raises(VocabularyMismatch, match=r"embedding has \d+ rows, fewer than"):
        check_same_vocabulary(str(tiny_text_dir), str(teacher), "teacher.model.name_or_path")
