"""processor.prompt_cache: rendered prompts kept across epochs give the same prompts and the
same training as rendering every time; the cache is bounded, keyed by example identity, and
never keeps a rendering that failed."""

from pathlib import Path

import pytest

from opsd_mm.cli import build_trainer
from opsd_mm.config import ConfigError, load_config
from opsd_mm.train.prompt_cache import PromptCache
from opsd_mm.types import Example, Prompt

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_text.yaml"


class Renderer:
    def __init__(self):
        self.calls = []

    def __call__(self, ex):
        self.calls.append(ex.id)
        if ex.question == "bad":
            raise ValueError(f"example '{ex.id}': bad image")
        return Prompt(input_ids=[len(self.calls)], text=ex.question, meta={"template": "t"})


def _ex(i, question="q"):
    return Example(id=f"e{i}", question=question, privileged="p", answer="1")


def test_hits_return_the_same_prompt_with_their_own_meta():
    render = Renderer()
    cache = PromptCache(render, max_entries=8)
    ex = _ex(0)
    first = cache(ex)
    first.meta["key"] = "written by the trainer"
    second = cache(ex)
    assert render.calls == ["e0"] and (cache.hits, cache.misses) == (1, 1)
    assert second.input_ids == first.input_ids and second.text == first.text
    assert second.meta == {"template": "t"}  # the first caller's write did not leak


def test_bounded_least_recently_used_and_off_at_zero():
    render = Renderer()
    cache = PromptCache(render, max_entries=2)
    a, b, c = _ex(0), _ex(1), _ex(2)
    cache(a), cache(b), cache(a), cache(c)  # c evicts b (a was used more recently)
    cache(a), cache(b)
    assert render.calls == ["e0", "e1", "e2", "e1"]
    off = PromptCache(render, max_entries=0)
    off(a), off(a)
    assert render.calls[-2:] == ["e0", "e0"]


def test_keyed_by_identity_not_by_id_and_failures_not_kept():
    render = Renderer()
    cache = PromptCache(render, max_entries=8)
    one, other = _ex(0, "first question"), _ex(0, "second question")  # the same id
    assert cache(one).text == "first question"
    assert cache(other).text == "second question"
    bad = _ex(5, "bad")
    for _ in range(2):
        with pytest.raises(ValueError, match="e5"):
            cache(bad)
    assert render.calls.count("e5") == 2


def test_negative_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="processor.prompt_cache"):
        load_config(TINY, [f"run_dir={tmp_path}", "processor.prompt_cache=-1"])


def test_training_with_the_cache_is_identical(tiny_cache, tiny_text_dir, tmp_path):
    """Two epochs of 4 examples: the second epoch's prompts come from the cache, and the
    losses equal those of a run that renders every time."""
    runs = {}
    for size in (0, 16):
        cfg = load_config(
            TINY,
            [
                f"run_dir={tmp_path / str(size)}",
                f"model.tiny_cache_dir={tiny_cache}",
                "logging.progress=false",
                "trainer.save_every=0",
                "trainer.max_steps=4",
                "data.synthetic_size=4",
                f"processor.prompt_cache={size}",
            ],
        )
        trainer = build_trainer(cfg)
        runs[size] = ([m["loss"] for m in trainer.train()], trainer)
    (plain, _), (cached, trainer) = runs[0], runs[16]
    assert cached == plain  # exactly: the cache returns the same ids, the same computation
    assert trainer.student_prompt.hits == 4 and trainer.teacher_prompt.hits == 4
