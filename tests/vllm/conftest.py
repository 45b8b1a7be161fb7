"""Fixtures for the vLLM engine tests, which run in the vLLM environment (``make test-vllm``).

Why a second environment: the CPU build of vLLM pins its own torch and transformers, so it
cannot share the main virtual environment. In the main environment ``import vllm`` fails and
every test marked ``vllm`` is skipped here, at collection.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

from opsd_mm.testing.server import ServerProcess, server_env

# ``origin is None`` is a namespace package: this very directory, when tests/ is on sys.path.
_SPEC = importlib.util.find_spec("vllm")
HAS_VLLM = _SPEC is not None and _SPEC.origin is not None


def pytest_collection_modifyitems(config, items):
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here (run: make test-vllm)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def text_setup(tiny_text_dir):
    """(model path, processor, fp32 HF model) for the tiny text model."""
    from transformers import AutoModelForCausalLM

    from opsd_mm.config import ProcessorConfig
    from opsd_mm.processors import build_processor

    path = str(tiny_text_dir)
    proc = build_processor(ProcessorConfig(), path, "qwen3")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, proc, model


@pytest.fixture(scope="module")
def text_prompts(text_setup) -> list:
    """Six student prompts of different lengths, keyed by example id."""
    from opsd_mm.types import Example

    _, proc, _ = text_setup
    questions = [
        "Compute 3 + 4.",
        "Compute 12 - 5 + 7 - 2.",
        "What is the total of eight and nine?",
        "Find the sum.",
        "Compute 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1.",
        "Let us check the answer step by step, then give the result of 6 - 2.",
    ]
    prompts = []
    for i, question in enumerate(questions):
        ex = Example(id=f"q{i}", question=question)
        p = proc.student_prompt(ex)
        p.meta["key"] = ex.id
        prompts.append(p)
    return prompts


@torch.no_grad()
def _trainer_logprobs(model, prompt_ids, completion_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits_TV = model(input_ids=ids).logits[0].float()
    P, C = len(prompt_ids), len(completion_ids)
    lp_CV = logits_TV[P - 1 : P - 1 + C].log_softmax(-1)
    return lp_CV.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


@pytest.fixture(scope="session")
def trainer_logprobs():
    """log p of each completion token under a plain transformers forward (the trainer's view):
    ``trainer_logprobs(model, prompt_ids, completion_ids) -> [C]``."""
    return _trainer_logprobs


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def main_python() -> Path:
    """The main environment's python (the trainer side, no vLLM); skips when it is missing."""
    path = ROOT / ".venv" / "bin" / "python"
    if not path.exists():
        pytest.skip(f"the main environment {path} is missing (make venv)")
    return path


@pytest.fixture(scope="session")
def train_via_server(main_python):
    """``train(run_dir, tiny_cache, url, *overrides)``: ``opsd-mm train configs/tiny_text.yaml``
    for 3 steps (overrides come last) in the MAIN environment, generating through the server
    at ``url``; returns the CompletedProcess, or with ``log=PATH`` the running Popen, its
    output going to PATH."""

    def train(run_dir, tiny_cache, url, *extra, timeout=300, log=None):
        cmd = [
            str(main_python),
            "-m",
            "opsd_mm.cli",
            "train",
            str(ROOT / "configs" / "tiny_text.yaml"),
            "rollout.engine=vllm_server",
            f"rollout.server_url={url}",
            f"run_dir={run_dir}",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
            "trainer.max_steps=3",
            "trainer.save_every=0",
            *extra,
        ]
        if log is not None:
            with open(log, "w") as out:
                return subprocess.Popen(cmd, env=server_env(), stdout=out, stderr=subprocess.STDOUT)
        return subprocess.run(
            cmd, capture_output=True, text=True, env=server_env(), timeout=timeout
        )

    return train


@pytest.fixture(scope="module")
def server(tiny_text_dir):
    """An ``opsd-mm serve`` of the tiny text model on loopback, one per test module (a module's
    tests share its weights and state, as a long-lived server's clients would)."""
    srv = ServerProcess(tiny_text_dir)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def engine_gap():
    """``gap(proc, model, examples, prompts, rollouts_P_G)``: the mean |log p_engine - log
    p_model| over the rollouts' tokens, the model scoring each completion after its student
    prompt (images included) in one batch."""
    from opsd_mm.train.metrics import logprob_gap, pad_logprobs

    def gap(proc, model, examples, prompts, rollouts_P_G) -> float:
        pairs = [
            proc.pair(ex, r.completion_ids, student=p)
            for ex, p, rs in zip(examples, prompts, rollouts_P_G)
            for r in rs
        ]
        batch = proc.collate(pairs)
        P, C = batch.student.prompt_width, batch.completion_ids_BC.shape[1]
        with torch.no_grad():
            logits_BCV = model(**batch.student.model_inputs).logits[:, P - 1 : P - 1 + C]
        ids_BC1 = batch.completion_ids_BC[..., None]
        model_BC = logits_BCV.float().log_softmax(-1).gather(-1, ids_BC1)[..., 0]
        engine_BC = pad_logprobs([r.logprobs for rs in rollouts_P_G for r in rs], C)
        mask_BC = batch.completion_mask_BC.bool()
        return logprob_gap(engine_BC[mask_BC], model_BC[mask_BC])

    return gap


@pytest.fixture(scope="session")
def scored_teacher():
    """``scored(proc, model, engine, pairs, top_k)``: per pair, (the engine's teacher scores of
    its completion after its teacher prompt, images included; the transformers teacher
    forward's log-distributions over those tokens [C, V]; the completion ids [C]), the forward
    in one padded batch."""
    from opsd_mm.types import Prompt

    def scored(proc, model, engine, pairs, top_k: int):
        batch = proc.collate(pairs)
        P, C = batch.teacher.prompt_width, batch.completion_ids_BC.shape[1]
        with torch.no_grad():
            logits_BCV = model(**batch.teacher.model_inputs).logits[:, P - 1 : P - 1 + C]
        logp_BCV = logits_BCV.float().log_softmax(-1)
        rows = [
            Prompt(input_ids=p.teacher.input_ids + p.completion_ids, images=p.teacher.images)
            for p in pairs
        ]
        scores = engine.score(rows, [len(p.teacher.input_ids) for p in pairs], top_k)
        out = []
        for b, (pair, s) in enumerate(zip(pairs, scores)):
            n = len(pair.completion_ids)
            out.append((s, logp_BCV[b, :n], batch.completion_ids_BC[b, :n]))
        return out

    return scored
