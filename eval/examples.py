"""Evaluate in-memory ``Example``s with the harness: greedy decoding, the last ``\\boxed{}``
must equal ``Example.answer`` exactly, from the student or the teacher context.

Used by the offline demo; useful for any synthetic split whose answers are exact strings.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from opsd_mm.types import Example


class ExamplesBenchmark:
    """In-memory Examples as an evaluation-harness benchmark (the demo's splits): greedy, last ``\\boxed{}`` must equal
    the answer exactly (integers only, so no symbolic equivalence is needed)."""

    hub_id = "synthetic"
    label = "exact match of the last \\boxed{} (in-memory examples)"
    headline = ("accuracy",)
    id_columns = ("id",)

    def __init__(self, name: str, examples: list[Example], max_new_tokens: int) -> None:
        self.name = name
        self.split = name
        self.max_new_tokens = max_new_tokens
        self._by_id = {ex.id: ex for ex in examples}

    def load(self, data_dir: Any = None) -> Any:
        import datasets

        return datasets.Dataset.from_dict({"id": list(self._by_id)})

    def item_id(self, item: dict[str, Any]) -> str:
        return str(item["id"])

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        return {}

    def prompt(self, item: dict[str, Any]) -> Example:
        return self._by_id[item["id"]]

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        from opsd_mm.eval.grading import last_boxed

        extracted = last_boxed(response)
        gold = self._by_id[item["id"]].answer
        correct = extracted is not None and extracted.strip() == gold
        return {"correct": correct, "extracted": extracted, "rule": "boxed_exact"}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(records)
        return {
            "accuracy": sum(bool(r["correct"]) for r in records) / max(n, 1),
            "n": n,
            "n_errors": sum(bool(r.get("error")) for r in records),
        }

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0, "max_new_tokens": self.max_new_tokens}


class TeacherView:
    """The processor with the teacher context as 'student prompt': the harness always renders
    ``student_prompt``, and this is how it measures teacher-context accuracy."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def student_prompt(self, ex: Example) -> Any:
        return self._processor.teacher_prompt(ex)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def evaluate_examples(
    model: torch.nn.Module,
    processor: Any,
    examples: list[Example],
    out_dir: Path,
    name: str,
    max_new_tokens: int,
    context: str = "student",
) -> float:
    """Greedy accuracy of ``model`` on ``examples`` in the given context, via the harness."""
    from opsd_mm.eval.runner import run_benchmark
    from opsd_mm.rollout.hf import HFEngine

    shutil.rmtree(out_dir / name, ignore_errors=True)  # the runner would resume stale records
    engine = HFEngine.for_processor(model, processor)
    view = processor if context == "student" else TeacherView(processor)
    summary = run_benchmark(
        ExamplesBenchmark(name, examples, max_new_tokens),
        engine,
        view,
        out_dir,
        decode=lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True),
        batch_size=64,
        progress=False,
    )
    return 100.0 * summary["metrics"]["accuracy"]
