"""The LLM judge against the real thing: vLLM's OpenAI-compatible server (its ``api_server``
entry point, as ``vllm serve`` runs it; the CPU build's ``vllm`` command cannot read its own
version) on the tiny text model, on loopback, driven by the ``opsd-mm eval`` command for
MathVista and AMO-Bench on the fixture copies (tests/fixtures). A random tiny model's replies are
gibberish: what is checked is the plumbing - vLLM accepts the requests as sent, the replies
land in predictions.jsonl under the official prompts' hashes, the labels, a rerun and
``eval score`` that send nothing (the server's own request counter), and vLLM's refusals of an
over-long budget and an over-long prompt as the one-line error and the recorded per-request
failure. Refusals and timeouts in general: tests/eval/test_eval_judge.py, against a stub."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from opsd_mm.testing.server import free_port, server_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
JUDGE = "tiny-judge"


@pytest.fixture(scope="module")
def judge_server(tiny_text_dir, tmp_path_factory):
    """vLLM's OpenAI server on the tiny text model: loopback, fp32, a 2,048-token context,
    1 GiB of KV cache (server_env)."""
    port = free_port()
    log = tmp_path_factory.mktemp("judge") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
        str(tiny_text_dir), "--served-model-name", JUDGE, "--host", "127.0.0.1", "--port",
        str(port), "--max-model-len", "2048", "--dtype", "float32",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    msg = "vLLM server did not start:\n" + log.read_text()[-3000:]
                    raise RuntimeError(msg) from None
                time.sleep(2)
        yield url
    finally:
        proc.kill()
        proc.wait()


def served(url: str) -> int:
    """Requests the server finished (any reason), from its Prometheus counter."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    found = re.findall(r'^vllm:request_success_total\{[^}]*model_name="tiny-judge"[^}]*\} (\S+)$',
                       text, flags=re.M)  # fmt: skip
    return int(sum(float(v) for v in found))


def opsd_mm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("opsd-mm")
    run = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=server_env(), timeout=900
    )
    if check:
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_opsd_mm_eval_with_vllm_as_judge(judge_server, tiny_cache, tiny_text_dir, tmp_path):
    from opsd_mm.eval.benchmarks import amo_bench, mathvista
    from opsd_mm.model.tiny import resolve_tiny
    from tests.fixtures.benchmarks import fixture_rows, write_fixtures

    data = tmp_path / "data"
    write_fixtures(data, ["mathvista", "amo_bench"])
    vl_model = resolve_tiny("qwen2-vl", tiny_cache)
    out = tmp_path / "run"
    judge = ["--judge-url", f"{judge_server}/v1", "--judge-model", JUDGE, "--judge-max-tokens", "8"]
    common = ["--data-dir", str(data), "--output", str(out), "--max-new-tokens", "8"]
    common += ["--no-progress", *judge]

    def run_both() -> str:
        a = opsd_mm("eval", "--model", str(vl_model), "--benchmarks", "mathvista", *common)
        b = opsd_mm("eval", "--model", str(tiny_text_dir), "--benchmarks", "amo_bench", *common)
        return a.stdout + b.stdout

    before = served(judge_server)
    printed = run_both()
    summary = json.loads((out / "summary.json").read_text())
    vista, amo = summary["mathvista"], summary["amo_bench"]
    assert vista["label"] == f"official extraction by {JUDGE}"
    assert amo["label"].startswith(f"official grading; description answers judged by {JUDGE}")
    assert "accuracy" in amo["headline"] and amo["metrics"]["n_description"] == 1

    # Every judge entry is a reply vLLM gave to the official prompt built from the record.
    rows = {r["pid"]: r for r in fixture_rows("mathvista")}
    recs = records(out / "mathvista" / "predictions.jsonl")
    n_vista = 0
    for pid, rec in recs.items():
        for response, score in zip(rec["responses"], rec["scores"]):
            for entry in score.get("judge", []):
                prompt = mathvista.extraction_prompt(rows[pid]["query"], response)
                assert entry["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
                assert entry["model"] == JUDGE and "error" not in entry
                assert score["rule"] == "judge" and score["official_rule"]
                n_vista += 1
    assert n_vista == vista["metrics"]["judge_calls"] >= 1
    amo_rows = {str(r["question_id"]): r for r in fixture_rows("amo_bench")}
    (rec,) = [r for r in records(out / "amo_bench" / "predictions.jsonl").values()
              if r["meta"]["answer_type"] == "description"]  # fmt: skip
    score = rec["scores"][0]
    prompt = amo_bench.judge_prompt(
        amo_rows[rec["id"]]["prompt"],
        amo_rows[rec["id"]]["answer"],
        amo_bench.extract(rec["responses"][0], "description"),
    )
    assert [e["sample"] for e in score["judge"]] == [0, 1, 2, 3, 4]
    assert {e["prompt_sha256"] for e in score["judge"]} == {
        hashlib.sha256(prompt.encode()).hexdigest()
    }
    assert score["votes"] == sum(amo_bench.judge_vote(e["reply"]) for e in score["judge"])
    assert amo["metrics"]["judge_calls"] == 5 and amo["metrics"]["judge_errors"] == 0
    sent = n_vista + 5
    assert served(judge_server) - before == sent
    assert f"judge {JUDGE}: {n_vista} requests sent" in printed

    # The same commands again: nothing generated, nothing asked, the same summary.
    printed = run_both()
    assert served(judge_server) - before == sent
    assert printed.count("0 requests sent") == 2
    assert json.loads((out / "summary.json").read_text()) == summary

    # eval score re-scores offline from the stored replies (the judge found in the records).
    for name in ("mathvista", "amo_bench"):
        opsd_mm("eval", "score", "--benchmark", name, "--predictions",
                str(out / name / "predictions.jsonl"), "--data-dir", str(data),
                "--output", str(tmp_path / "rescored"))  # fmt: skip
    assert json.loads((tmp_path / "rescored" / "summary.json").read_text()) == summary
    assert served(judge_server) - before == sent


def test_vllm_refusals(judge_server, tiny_text_dir, tmp_path):
    from tests.fixtures.benchmarks import write_fixtures

    data = tmp_path / "data"
    write_fixtures(data, ["amo_bench"])
    # AMO-Bench's official budget, 8,192 tokens, exceeds this judge's 2,048: vLLM refuses, the
    # run stops with one line (exit 2) that says which flag to lower.
    run = opsd_mm(
        "eval", "--model", str(tiny_text_dir), "--benchmarks", "amo_bench", "--data-dir",
        str(data), "--output", str(tmp_path / "a"), "--max-new-tokens", "4", "--no-progress",
        "--judge-url", f"{judge_server}/v1", "--judge-model", JUDGE, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = [x for x in run.stderr.splitlines() if "judge endpoint" in x]
    assert "refused the request: HTTP 400" in line and "lower --judge-max-tokens" in line

    # A prompt longer than the judge's context is recorded as that item's failure.
    from opsd_mm.eval.judge import Judge, JudgeRequest

    judge = Judge(JUDGE, f"{judge_server}/v1", max_tokens=8)
    long = JudgeRequest("word " * 5000, 0.0, 8)
    judge.ask([long, JudgeRequest("Say yes.", 0.0, 8)])
    reply = judge.reply(long, "long")
    assert reply.text == "" and reply.error.startswith("HTTP 400")
    assert judge.reply(JudgeRequest("Say yes.", 0.0, 8), "short").error is None
