"""Fixtures for the eval tests: benchmark copies written once per session, and a scripted
engine/processor pair implementing the RolloutEngine and Processor protocols."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from opsd_mm.types import Example, Prompt, Rollout, SamplingConfig


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory):
    from tests.fixtures.benchmarks import write_fixtures

    root = tmp_path_factory.mktemp("eval-fixtures")
    write_fixtures(root)
    return root


class PlainProcessor:
    """Processor stand-in for the ``plain`` student template: the prompt text is the question;
    the example id travels in ``meta`` so the scripted engine can answer per item."""

    pad_token_id = 0
    eos_token_ids = [1]
    suppress_token_ids: list[int] = []

    def student_prompt(self, ex: Example) -> Prompt:
        return Prompt(
            input_ids=[2, 3, len(ex.question)],
            text=ex.question,
            images=list(ex.images),
            meta={"id": ex.id, "benchmark": ex.meta.get("benchmark")},
        )

    def teacher_prompt(self, ex: Example) -> Prompt:  # pragma: no cover - unused in eval
        raise NotImplementedError

    def pair(self, ex, completion_ids, student=None):  # pragma: no cover
        raise NotImplementedError

    def collate(self, pairs):  # pragma: no cover
        raise NotImplementedError


Script = Callable[[str, str, int], str]  # (benchmark, item id, sample index) -> response


class ScriptedEngine:
    """Deterministic RolloutEngine: each completion is one token id indexing the response
    table, so ``decode`` maps ids back to text. ``fail_after`` raises on that generate call
    (simulating a killed run); ``prompts_seen`` counts generated prompts."""

    def __init__(self, script: Script, fail_after: int | None = None) -> None:
        self.script, self.fail_after = script, fail_after
        self.table: list[str] = []
        self.calls = 0
        self.prompts_seen: list[str] = []

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig
    ) -> list[list[Rollout]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        out = []
        for p in prompts:
            self.prompts_seen.append(p.meta["id"])
            row = []
            for j in range(n):
                self.table.append(self.script(p.meta["benchmark"], p.meta["id"], j))
                row.append(Rollout(completion_ids=[len(self.table) - 1], finish_reason="eos"))
            out.append(row)
        return out

    def sync_weights(self, model, version=None) -> None:  # pragma: no cover
        pass

    def decode(self, ids: Sequence[int]) -> str:
        return self.table[ids[0]]


# Canned responses: a mix of right, wrong and unparseable answers per benchmark.
CANNED = {
    ("mmmu", "validation_Math_1"): "The shaded area is 14, so the answer is (B).",
    ("mmmu", "validation_Art_Theory_2"): "C",
    ("mmmu", "validation_Physics_3"): "The answer is 12.97",
    ("mmmu", "validation_Economics_4"): "It is 1/2 of the budget.",
    ("mathvista", "1"): "3",
    ("mathvista", "2"): "The side is 4, so the answer is (B).",
    ("mathvista", "3"): "The bar reaches \\boxed{2.7}.",
    ("mathvision", "1"): "There are four circles. \\boxed{B}",
    ("mathvision", "2"): "The widest angle is in shape \\boxed{D}",
    ("mathvision", "3"): "Half is shaded: \\boxed{0.5}",
    ("wemath", "1:2steps_1"): "<Thought process>: count <Answer>: <<B>>",
    ("wemath", "1:2steps_2"): "I think \\boxed{A}",
    ("wemath", "1:2steps_multi"): "<Answer>: B.",
    ("zerobench", "1"): "It looks like the Eiffel tower. {paris}",
    ("zerobench", "2"): "I save { 11.90 }",
    ("aime24", "60"): "$2^{10} = 1024$, so \\boxed{24}.",
    ("aime24", "61"): "\\boxed{20}",
    ("aime25", "1"): "1+2+3+4+5 = \\boxed{15}",
    ("hmmt25", "1"): "Telescoping gives \\boxed{0.8}",
    ("hmmt25", "3"): "\\boxed{3!}",
    ("amo_bench", "1"): "<think>maybe 103</think>Checked.\n### The final answer is: $\\boxed{101}$",
    ("amo_bench", "2"): "### The final answer is: $\\boxed{\\{2\\}}$",
    ("amo_bench", "9"): "### The final answer is: all periodic functions",
    ("math500", "test/prealgebra/1.json"): "\\boxed{\\frac{3}{4}}",
    ("math500", "test/precalculus/3.json"): "\\boxed{(3, \\frac{\\pi}{2})}",
}


def canned(bench: str, item_id: str, j: int) -> str:
    """Sample 0 is the canned answer; later samples alternate between it and a wrong one."""
    text = CANNED.get((bench, item_id), "I am not sure.")
    return text if j % 2 == 0 else "No idea, maybe \\boxed{7} {7} <Answer>: E"


@pytest.fixture
def plain_processor():
    return PlainProcessor()


@pytest.fixture
def make_engine():
    """``make_engine(fail_after=None, script=canned)`` -> a fresh ScriptedEngine."""

    def make(fail_after: int | None = None, script: Script = canned) -> ScriptedEngine:
        return ScriptedEngine(script, fail_after=fail_after)

    return make


@pytest.fixture
def canned_script():
    return canned
