"""teacher.scoring=server against a real ``opsd-mm serve`` on loopback: the server's teacher
log-probs (sampled token and top-k) equal a transformers forward of the same weights, before and
after a weight sync, text and VL; 3-step training runs whose losses match the local live
teacher's on the same rollouts (same server, same seeds); and a fixed LoRA teacher served as the
base under the student's adapter, against the local fixed teacher."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch

from opsd_mm.rollout.client import ServerEngine
from opsd_mm.testing.server import ServerProcess
from opsd_mm.train.metrics import read_metrics
from opsd_mm.types import Example, Prompt, SamplingConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOP_K = 8
TOL = 1e-4


def _check_scores(scores, logp_CV, ids_C, top_k):
    """One row's server scores against the reference log-distributions [C, V]: the token's
    log-prob, and a top-k whose ids carry the reference's log-probs and are a top-k of it
    (ties or float-level near-ties may order or pick differently; both are checked within TOL).
    Returns the fraction of positions whose top-k ids are exactly the reference's."""
    token_C = logp_CV.gather(-1, ids_C[:, None])[:, 0]
    assert len(scores.logprobs) == len(ids_C)
    torch.testing.assert_close(torch.tensor(scores.logprobs), token_C, rtol=0, atol=TOL)
    if not top_k:
        assert scores.topk_ids is None
        return 1.0
    ids_CK = torch.tensor(scores.topk_ids)
    values_CK = torch.tensor(scores.topk_logprobs)
    assert ids_CK.shape == (len(ids_C), top_k)
    torch.testing.assert_close(values_CK, logp_CV.gather(-1, ids_CK), rtol=0, atol=TOL)
    ref = logp_CV.topk(top_k + 1, dim=-1)
    # Server's k-th best is at least the reference's (k+1)-th: a valid top-k up to TOL.
    assert (values_CK[:, -1] >= ref.values[:, top_k] - TOL).all()
    assert (values_CK[:, :-1] >= values_CK[:, 1:] - TOL).all()  # most likely first
    same = (ids_CK.sort(-1).values == ref.indices[:, :top_k].sort(-1).values).all(-1)
    return same.float().mean().item()


@torch.no_grad()
def _hf_logprobs(model, ids, start):
    logits_TV = model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits_TV[start - 1 : len(ids) - 1].log_softmax(-1)


def test_server_scores_equal_hf_forward(server, text_setup, text_prompts, tmp_path):
    """Teacher prompts (with a privileged trace) + completions sampled by the server, scored by
    ``POST /score`` (k = 0 and k = 8): equal to the transformers forward; then after a LoRA step
    and a weight sync, equal to the updated model's forward (the live teacher)."""
    path, proc, base = text_setup
    engine = ServerEngine(
        server.url,
        tmp_path / "sync",
        eos_token_ids=proc.eos_token_ids,
        suppress_token_ids=proc.suppress_token_ids,
    )
    try:
        _scores_equal_hf_forward(engine, proc, base, text_prompts)
    finally:
        engine.release()  # the module's server serves the next test's trainer


def _scores_equal_hf_forward(engine, proc, base, text_prompts):
    from opsd_mm.config import LoraConfig, ModelConfig
    from opsd_mm.model.load import setup_trainable

    engine.sync_weights(base, version=0)
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=20, seed=3)
    rollouts = engine.generate(text_prompts[:4], 2, sampled)
    rows, starts = [], []
    for i, rs in enumerate(rollouts):
        ex = Example(id=f"q{i}", question="Compute 3 + 4.", privileged="3 + 4 = 7. \\boxed{7}")
        teacher_ids = proc.teacher_prompt(ex).input_ids
        for r in rs:
            rows.append(Prompt(input_ids=teacher_ids + r.completion_ids))
            starts.append(len(teacher_ids))

    def check(model):
        exact = []
        for top_k in (0, TOP_K):
            scores = engine.score(rows, starts, top_k)
            assert len(scores) == len(rows)
            for row, start, s in zip(rows, starts, scores):
                ids_C = torch.tensor(row.input_ids[start:])
                exact.append(
                    _check_scores(s, _hf_logprobs(model, row.input_ids, start), ids_C, top_k)
                )
        return min(exact)

    print("top-k ids identical to HF's (fraction of positions, worst row):", check(base))
    model = setup_trainable(
        copy.deepcopy(base), ModelConfig(lora=LoraConfig(enabled=True, r=8, alpha=16))
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    seq = rows[0].input_ids
    loss = model(input_ids=torch.tensor([seq]), labels=torch.tensor([seq])).loss
    loss.backward()
    opt.step()
    model.eval()
    before = engine.score(rows[:1], starts[:1], 0)[0].logprobs
    engine.sync_weights(model, version=1)
    after = engine.score(rows[:1], starts[:1], 0)[0].logprobs
    assert max(abs(a - b) for a, b in zip(after, before)) > 10 * TOL  # the weights moved
    check(model)


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="Qwen-VL processing needs torchvision"
)
def test_vl_server_scores_equal_hf_forward(tiny_cache, tmp_path, scored_teacher):
    """A tiny Qwen2.5-VL: the teacher side (question image + a teacher-only image) travels as
    PNG; the server's teacher log-probs and top-k equal the transformers forward of the teacher
    batch (M-RoPE positions, image features)."""
    from transformers import AutoModelForImageTextToText

    from opsd_mm.config import ProcessorConfig
    from opsd_mm.data.vl_tasks import draw_grid
    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors import build_processor

    path = str(resolve_tiny("qwen2.5-vl", tiny_cache))
    proc = build_processor(ProcessorConfig(), path, "qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    srv = ServerProcess(path, max_model_len=1024)
    srv.start()
    try:
        engine = ServerEngine(
            srv.url,
            tmp_path / "sync",
            eos_token_ids=proc.eos_token_ids,
            suppress_token_ids=proc.suppress_token_ids,
        )
        ex = Example(
            id="vl",
            question="<image 1>: how many red cells?",
            privileged="Two red cells: \\boxed{2}.",
            images=(draw_grid({(0, 0): "red", (1, 2): "red"}, 3, 3, 20),),
            teacher_images=(draw_grid({(2, 1): "red"}, 4, 5, 16),),
        )
        student = proc.student_prompt(ex)
        student.meta["key"] = ex.id
        rollouts = engine.generate(
            [student], 2, SamplingConfig(temperature=1.0, max_new_tokens=12, seed=1)
        )
        teacher = proc.teacher_prompt(ex)
        pairs = [
            proc.pair(ex, r.completion_ids, student=student, teacher=teacher) for r in rollouts[0]
        ]
        assert len(teacher.images) == 2
        for s, logp_CV, ids_C in scored_teacher(proc, model, engine, pairs, TOP_K):
            _check_scores(s, logp_CV, ids_C, TOP_K)
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "loss",
    [["loss.divergence=sampled_pg"], ["loss.divergence=jsd", f"loss.top_k={TOP_K}"]],
    ids=["sampled_pg", "jsd-topk"],
)
def test_train_server_teacher_matches_local(server, tiny_cache, tmp_path, train_via_server, loss):
    """3 steps with teacher.scoring=server and 3 with the local live teacher, through the same
    server with the same seeds: the same rollouts (the server holds the same weights at each
    step, every row seeded by (step, prompt, sample)), so the same losses up to the float
    difference between vLLM's and transformers' teacher forwards."""
    common = ["teacher.kind=live", "loss.temperature=1.0", *loss]
    rows = {}
    for scoring in ("local", "server"):
        run = train_via_server(
            tmp_path / scoring, tiny_cache, server.url, *common, f"teacher.scoring={scoring}"
        )
        assert run.returncode == 0, run.stderr[-3000:]
        rows[scoring] = read_metrics(tmp_path / scoring / "metrics.jsonl")
    local, served = rows["local"], rows["server"]
    assert [r["step"] for r in served] == [1, 2, 3]
    for a, b in zip(local, served):
        assert a["completion_len_mean"] == b["completion_len_mean"]  # the same rollouts
        assert math.isfinite(b["loss"]) and b["loss"] != 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-7), (a["loss"], b["loss"])
        assert b["divergence_mean"] == pytest.approx(a["divergence_mean"], rel=1e-3, abs=1e-6)
        assert "time/teacher_score" in b and "time/teacher" not in b
        assert "time/teacher" in a and "time/teacher_score" not in a
    print(
        "time/teacher (local):",
        [round(r["time/teacher"], 3) for r in local],
        "time/teacher_score (server):",
        [round(r["time/teacher_score"], 3) for r in served],
    )


def test_train_fixed_lora_teacher_on_server_matches_local(
    tiny_text_dir, tiny_cache, tmp_path, train_via_server
):
    """teacher.kind=fixed under LoRA: the server generates with the synced adapter and scores
    the teacher with its base weights. 3 steps match the local fixed teacher (adapter disabled
    in the trainer) on the same rollouts, and the server's sampling log-probs are the trainer's
    student's (log-prob gap ~0: the adapter is applied in generation)."""
    srv = ServerProcess(tiny_text_dir, extra_args=["--max-lora-rank", "8"])
    srv.start()
    try:
        rows = {}
        for kind, scoring in (("fixed", "local"), ("fixed", "server"), ("live", "server")):
            run = train_via_server(
                tmp_path / f"{kind}-{scoring}",
                tiny_cache,
                srv.url,
                f"teacher.kind={kind}",
                "loss.temperature=1.0",
                "loss.divergence=sampled_pg",
                f"teacher.scoring={scoring}",
            )
            assert run.returncode == 0, run.stderr[-3000:]
            rows[kind, scoring] = read_metrics(tmp_path / f"{kind}-{scoring}" / "metrics.jsonl")
    finally:
        srv.stop()
    local, served, live = rows["fixed", "local"], rows["fixed", "server"], rows["live", "server"]
    assert [r["step"] for r in served] == [1, 2, 3]
    adapter = tmp_path / "fixed-server" / "engine_weights" / "adapter" / "adapter_config.json"
    assert adapter.exists()
    for a, b in zip(local, served):
        assert a["completion_len_mean"] == b["completion_len_mean"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-7), (a["loss"], b["loss"])
        assert b["rollout/logprob_gap"] < 1e-4, b
        assert b["divergence_mean"] == pytest.approx(a["divergence_mean"], rel=1e-3, abs=1e-8)
        assert "time/teacher_score" in b and "time/teacher" not in b
    # The live teacher, next on the same server (which must drop the fixed run's adapter: its
    # sampling log-probs are the trainer's): step 1 is the same model, then the teachers part.
    assert all(r["rollout/logprob_gap"] < 1e-4 for r in live), live
    fixed_div = [r["divergence_mean"] for r in served]
    live_div = [r["divergence_mean"] for r in live]
    print("divergence_mean, fixed teacher on the server:", fixed_div, "live:", live_div)
    assert live_div[0] == pytest.approx(fixed_div[0], rel=1e-3)
    assert abs(live_div[-1] - fixed_div[-1]) > 100 * abs(
        fixed_div[-1] - local[-1]["divergence_mean"]
    )
