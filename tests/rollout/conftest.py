"""A fake engine behind the REAL server app (``opsd_mm.rollout.server`` under uvicorn, on a
thread): the HTTP side, the run claim and the weight transactions, tested in the main
environment, where vLLM cannot run. The engine is the only stand-in; tests/vllm run the same
server around vLLM."""

from __future__ import annotations

import pytest
import torch

from opsd_mm.rollout.shared import weight_set_problems
from opsd_mm.types import Rollout, TeacherScores

# The fake model's weights, in checkpoint format: what a reload must replace.
REFERENCE = [
    ("model.embed_tokens.weight", "float32", [32, 4]),
    ("model.layers.0.weight", "float32", [4, 4]),
    ("lm_head.weight", "float32", [32, 4]),
]


class FakeEngine:
    """The engine interface the service uses. Completions are a function of the prompt and
    the weights held (``self.weights``: name -> tensor); ``fail_after`` makes the next
    ``load_weights`` raise after that many tensors, as a torn file or a dead sender would."""

    max_model_len = 64
    vocab_size = 32
    max_logprobs = 4
    accepts_images = False

    def __init__(self) -> None:
        self.weights = {n: torch.zeros(s) for n, _, s in REFERENCE}
        self.loads = 0  # tensors loaded, ever
        self.fail_after: int | None = None
        self.eos_token_ids: list[int] = [1]
        self.suppress_token_ids: list[int] = []

    def check_weights(self, manifest):
        return weight_set_problems(REFERENCE, manifest)

    def load_weights(self, named_tensors) -> float:
        for i, (name, t) in enumerate(named_tensors):
            if self.fail_after is not None and i == self.fail_after:
                self.fail_after = None
                raise OSError("torn file")
            self.weights[name] = t.clone()
            self.loads += 1
        return 0.0

    def load_adapter(self, path) -> float:
        return 0.0

    def reset_caches(self) -> None:
        pass

    def _token(self) -> int:
        return int(self.weights["lm_head.weight"].sum().item()) % self.vocab_size

    def generate(self, prompts, n, sampling):
        return [
            [Rollout([len(p.input_ids) % self.vocab_size, self._token()], "length")] * n
            for p in prompts
        ]

    def score(self, prompts, starts, top_k):
        return [TeacherScores([-1.0] * (len(p.input_ids) - s)) for p, s in zip(prompts, starts)]


@pytest.fixture
def serve_fake():
    """``serve_fake(token=None, limits=None, lease_s=60) -> (service, url)``: the real app
    around a :class:`FakeEngine` on a thread, stopped after the test."""
    from opsd_mm.rollout.service import GenerationService
    from opsd_mm.testing.server import AppThread

    apps = []

    def serve(token=None, limits=None, lease_s=60.0):
        service = GenerationService(FakeEngine(), "fake", lease_s=lease_s)
        app = AppThread(service, token, limits).__enter__()
        apps.append(app)
        return service, app.url

    yield serve
    for app in apps:
        app.stop()


@pytest.fixture
def reference():
    """The fake engine's weights: :data:`REFERENCE`."""
    return REFERENCE


@pytest.fixture
def weights_model():
    """A module whose weights are :data:`REFERENCE` (what the fake engine accepts)."""

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(32, 4)
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False)])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()
            self.lm_head = torch.nn.Linear(4, 32, bias=False)

    torch.manual_seed(0)
    return Model()
