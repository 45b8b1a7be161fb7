"""The LLM judge (eval/judge.py) through ``opsd-mm eval``: the official prompts byte for byte,
the request format, replies stored in predictions.jsonl, a resumed run and ``eval score``
sending nothing, and refusals, timeouts, retries and bounded concurrency against a local stub
(an http.server on loopback speaking the chat-completions protocol). The same flow against
vLLM's real OpenAI-compatible server: tests/vllm/test_vllm_judge.py."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from opsd_mm.eval.benchmarks import amo_bench, mathvista
from opsd_mm.eval.benchmarks._common import EvalError
from opsd_mm.eval.cli import Runtime, add_eval_parser, main_eval
from opsd_mm.eval.judge import Judge, JudgeRequest
from tests.fixtures.benchmarks import fixture_rows

pytest.importorskip("openai")

# SHA-256 of the official prompt values, computed from the official files: lupantech/MathVista
# evaluation/prompts/ext_ans.py (demo_prompt) at 53d525874bdde205128e6b160b7357a88277d479, and
# meituan-longcat/AMO-Bench utils.py (SCORE_PROMPT) at 52e1f378e4bcb0c593e860be38f9251b1a192571.
MATHVISTA_DEMO_SHA256 = "a231722ced09cbd1f3fd16630ab58bf487f12e2f46ea0b26d1f2f6b5c50fb17c"
AMO_SCORE_SHA256 = "34875cd64ab8ecd13dde48ce1d2482431dc701707ec643b603c18063572b2011"

Reply = tuple[int, Any, dict[str, str], float]  # status, body, headers, delay (s)


class Stub:
    """A chat-completions endpoint on loopback: ``script(request, attempt) -> Reply`` decides
    each answer (``attempt``: how many times this exact body was received before); records
    every request, its headers, and the most requests in flight at once."""

    def __init__(self, script: Callable[[dict, int], Reply]) -> None:
        self.script, self.requests, self.headers = script, [], []
        self.in_flight = self.most_in_flight = 0
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with stub._lock:
                    attempt = stub._seen.get(raw.decode(), 0)
                    stub._seen[raw.decode()] = attempt + 1
                    stub.requests.append(body)
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                try:
                    status, payload, headers, delay = stub.script(body, attempt)
                    time.sleep(delay)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(text: str, model: str = "stub-judge") -> dict:
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def error(message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


def official_replies(body: dict, attempt: int) -> Reply:
    """MathVista: " B " (stripped by the scorer); AMO-Bench: a correct conclusion."""
    prompt = body["messages"][0]["content"]
    text = "### Conclusion: Correct" if "### Reference Answer" in prompt else " B "
    return 200, completion(text), {}, 0.0


@pytest.fixture
def stub():
    made = []

    def make(script=official_replies) -> Stub:
        made.append(Stub(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def eval_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opsd-mm")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["eval", *argv])


# ----------------------------------------------------------------------------- the prompts


def test_official_prompts_byte_for_byte():
    assert hashlib.sha256(mathvista.DEMO_PROMPT.encode()).hexdigest() == MATHVISTA_DEMO_SHA256
    assert hashlib.sha256(amo_bench.SCORE_PROMPT.encode()).hexdigest() == AMO_SCORE_SHA256
    p = mathvista.extraction_prompt("Q?", "R.")
    assert p.startswith("Please read the following example.") and p.endswith(
        "Extracted answer: B\n\nQ?\n\nR.\n\nExtracted answer: "
    )
    # AMO-Bench fills GOLD, then PRED, then QUESTION (a placeholder inside a value is replaced
    # too, as officially), and cuts a prompt of 20,000 characters or more to 10,000 + 10,000.
    p = amo_bench.judge_prompt("What is QUESTION?", "GOLD is PRED", "x")
    assert "### Reference Answer\nGOLD is x\n" in p and "### Problem\nWhat is QUESTION?" in p
    long = amo_bench.judge_prompt("q" * 30_000, "g", "p")
    assert len(long) == 20_000 + len("\n\n...\n\n") and "\n\n...\n\n" in long


@pytest.mark.parametrize(
    "reply, vote",
    [
        ("Reasoning...\n### Conclusion: Correct", True),
        ("### Conclusion: correct", True),
        ("### Conclusion: Incorrect", False),
        ("### Conclusion: Correct.", False),  # official: the word must stand alone
        ("### Conclusion: not correct", False),
        ("### Conclusion: It isn't correct", False),
        ("Conclusion: Incorrect ... later Conclusion: Correct", True),  # the last one counts
        ("Correct", True),  # no conclusion marker: the whole reply is read
        ("", False),
    ],
)
def test_amo_judge_vote_is_the_official_reading(reply, vote):
    assert amo_bench.judge_vote(reply) is vote


# ----------------------------------------------------------------------------- a judged run


def judged_run(root, out, url, engine, processor, *extra):
    args = eval_args(
        "--model", "scripted", "--benchmarks", "mathvista,amo_bench", "--data-dir", str(root),
        "--output", str(out), "--no-progress", "--judge-url", url, "--judge-model",
        "stub-judge", *extra,
    )  # fmt: skip
    return main_eval(args, runtime_factory=lambda a: Runtime(engine, processor, engine.decode))


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_judged_run_stores_replies_resumes_and_rescores_offline(
    fixture_root, plain_processor, make_engine, stub, tmp_path, capsys
):
    from tests.eval.conftest import CANNED

    judge = stub()
    out = tmp_path / "run"
    assert judged_run(fixture_root, out, judge.url, make_engine(), plain_processor) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())

    # MathVista: items 2 and 3 are not settled by the official pre-rules (1 is an integer, 4
    # has no image): one extraction request each, in the official format.
    vista = [r for r in judge.requests if "### Reference Answer" not in r["messages"][0]["content"]]
    rows = {r["pid"]: r for r in fixture_rows("mathvista")}
    expected = [
        mathvista.extraction_prompt(rows[pid]["query"], CANNED[("mathvista", pid)])
        for pid in ("2", "3")
    ]
    assert sorted(r["messages"][0]["content"] for r in vista) == sorted(expected)
    for r in vista:
        assert r["model"] == "stub-judge" and r["messages"][0]["role"] == "user"
        assert len(r["messages"]) == 1
        assert r["temperature"] == 0.0 and r["max_completion_tokens"] == 1024 and r["n"] == 1
    # AMO-Bench: the one description item, five votes of the same official prompt.
    amo = [r for r in judge.requests if "### Reference Answer" in r["messages"][0]["content"]]
    assert len(amo) == 5 and len({r["messages"][0]["content"] for r in amo}) == 1
    assert all(r["temperature"] == 1.0 and r["max_completion_tokens"] == 8192 for r in amo)

    m = summary["mathvista"]
    assert m["label"] == "official extraction by stub-judge"
    assert m["metrics"]["judge_calls"] == 2 and m["metrics"]["judge_errors"] == 0
    assert m["metrics"]["rules"] == {"judge": 2, "official:integer": 1}
    recs = {r["id"]: r for r in records(out / "mathvista" / "predictions.jsonl")}
    (entry,) = recs["2"]["scores"][0]["judge"]
    assert entry == {
        "model": "stub-judge",
        "prompt_sha256": hashlib.sha256(expected[0].encode()).hexdigest(),
        "sample": 0,
        "reply": " B ",
    }
    assert recs["2"]["correct"] and recs["2"]["extracted"] == "4"  # " B " -> B -> choice 4
    a = summary["amo_bench"]
    assert a["label"].startswith("official grading; description answers judged by stub-judge")
    assert a["metrics"]["judge_calls"] == 5 and "accuracy" in a["headline"]
    assert a["metrics"]["by_answer_type"]["description"]["accuracy"] == 1.0
    assert "judge stub-judge: 7 requests sent, 0 answered from stored replies" in printed
    assert "| mathvista | accuracy |" in printed and "official extraction by stub-judge" in printed

    # Resumed (the same command again): nothing is generated or asked twice.
    sent = len(judge.requests)
    engine = make_engine()
    assert judged_run(fixture_root, out, judge.url, engine, plain_processor) == 0
    assert len(judge.requests) == sent and engine.prompts_seen == []
    assert "judge stub-judge: 0 requests sent, 7 answered" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == summary

    # eval score: the judge named in the predictions, its stored replies, no endpoint.
    judge.close()
    for name in ("mathvista", "amo_bench"):
        args = eval_args(
            "score", "--benchmark", name, "--predictions", str(out / name / "predictions.jsonl"),
            "--data-dir", str(fixture_root), "--output", str(tmp_path / "rescored"),
        )  # fmt: skip
        assert main_eval(args) == 0
    assert json.loads((tmp_path / "rescored" / "summary.json").read_text()) == summary
    args = eval_args(
        "score", "--benchmark", "mathvista", "--predictions",
        str(out / "mathvista" / "predictions.jsonl"), "--data-dir", str(fixture_root),
        "--output", str(tmp_path / "other"), "--judge-model", "another-judge",
    )  # fmt: skip
    with pytest.raises(EvalError, match="mathvista item 2: no stored reply from judge 'another"):
        main_eval(args)


def test_a_resumed_run_asks_only_for_new_items(
    fixture_root, plain_processor, make_engine, stub, tmp_path, capsys
):
    judge = stub()
    out = tmp_path / "run"
    judged_run(fixture_root, out, judge.url, make_engine(), plain_processor, "--limit", "2")
    assert len(judge.requests) == 1  # mathvista item 2 (item 1: integer; amo 1, 2: parser)
    judged_run(fixture_root, out, judge.url, make_engine(), plain_processor)
    assert len(judge.requests) == 1 + 1 + 5  # mathvista item 3, amo_bench item 9's votes
    assert (
        "judge stub-judge: 6 requests sent, 1 answered from stored replies"
        in (capsys.readouterr().out.splitlines()[-2])
    )


def test_a_run_without_judge_cannot_resume_with_one(
    fixture_root, plain_processor, make_engine, stub, tmp_path
):
    out = tmp_path / "run"
    args = eval_args(
        "--model", "m", "--benchmarks", "mathvista", "--data-dir", str(fixture_root),
        "--output", str(out), "--no-progress",
    )  # fmt: skip
    engine = make_engine()
    main_eval(args, runtime_factory=lambda a: Runtime(engine, plain_processor, engine.decode))
    with pytest.raises(EvalError, match="different label"):
        judged_run(fixture_root, out, stub().url, make_engine(), plain_processor)


def test_eval_score_judges_saved_responses(
    fixture_root, plain_processor, make_engine, stub, tmp_path, capsys
):
    """Predictions made without a judge, judged afterwards by ``eval score --judge-url``."""
    out = tmp_path / "run"
    args = eval_args(
        "--model", "m", "--benchmarks", "mathvista", "--data-dir", str(fixture_root),
        "--output", str(out), "--no-progress",
    )  # fmt: skip
    engine = make_engine()
    main_eval(args, runtime_factory=lambda a: Runtime(engine, plain_processor, engine.decode))
    judge = stub()
    args = eval_args(
        "score", "--benchmark", "mathvista", "--predictions",
        str(out / "mathvista" / "predictions.jsonl"), "--data-dir", str(fixture_root),
        "--output", str(tmp_path / "judged"), "--judge-url", judge.url, "--judge-model", "stub-judge",
    )  # fmt: skip
    assert main_eval(args) == 0
    assert len(judge.requests) == 2
    assert "judge stub-judge: 2 requests sent" in capsys.readouterr().out
    s = json.loads((tmp_path / "judged" / "summary.json").read_text())["mathvista"]
    assert s["label"] == "official extraction by stub-judge" and s["metrics"]["judge_calls"] == 2


# ----------------------------------------------------------------------------- failures


def ask(url: str, n: int = 1, **options: Any) -> Judge:
    judge = Judge("stub-judge", url, **{"retries": 0, **options})
    judge.ask([JudgeRequest(f"prompt {i}", 0.0, 16) for i in range(n)])
    return judge


@pytest.mark.parametrize(
    "status, message",
    [
        (401, "Incorrect API key provided: sk-***"),
        (404, "The model `stub-judge` does not exist"),
        (400, "Unsupported parameter: 'max_completion_tokens'\nis not supported"),
    ],
)
def test_a_refusal_is_one_clear_line(stub, status, message):
    judge = stub(lambda body, attempt: (status, error(message), {}, 0.0))
    with pytest.raises(EvalError) as e:
        ask(judge.url, retries=2)
    text = str(e.value)
    assert "\n" not in text and f"refused the request: HTTP {status}" in text
    assert judge.url in text and "stub-judge" in text
    assert len(judge.requests) == 1  # a 4xx refusal is not retried


def test_unreachable_and_timeout_are_one_clear_line(stub):
    from opsd_mm.testing.server import free_port

    with pytest.raises(EvalError, match=r"is unreachable after 1 retries") as e:
        ask(f"http://127.0.0.1:{free_port()}/v1", retries=1)
    assert "\n" not in str(e.value)
    slow = stub(lambda body, attempt: (200, completion("x"), {}, 3.0))
    with pytest.raises(EvalError, match=r"did not answer within 0.5 s \(0 retries\)") as e:
        ask(slow.url, timeout=0.5)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("status", [429, 503])
def test_transient_failures_are_retried_with_backoff(stub, status):
    def flaky(body, attempt):
        if attempt < 2:
            return status, error("busy"), {"retry-after-ms": "10"}, 0.0
        return 200, completion("ok"), {}, 0.0

    judge_stub = stub(flaky)
    judge = ask(judge_stub.url, retries=2)
    assert len(judge_stub.requests) == 3 and judge.sent == 1
    assert judge.reply(JudgeRequest("prompt 0", 0.0, 16), "item").text == "ok"
    with pytest.raises(EvalError, match=f"HTTP {status}"):
        ask(stub(flaky).url, retries=1)


def test_a_prompt_too_long_for_the_judge_is_recorded_not_fatal(
    fixture_root, plain_processor, make_engine, stub, tmp_path
):
    def short_context(body, attempt):
        if "bar reaches" in body["messages"][0]["content"]:
            message = "This model's maximum context length is 64 tokens. However, you requested 900"
            return 400, error(message), {}, 0.0
        return official_replies(body, attempt)

    out = tmp_path / "run"
    judged_run(fixture_root, out, stub(short_context).url, make_engine(), plain_processor)
    m = json.loads((out / "summary.json").read_text())["mathvista"]["metrics"]
    assert m["judge_calls"] == 2 and m["judge_errors"] == 1
    rec = {r["id"]: r for r in records(out / "mathvista" / "predictions.jsonl")}["3"]
    (entry,) = rec["scores"][0]["judge"]
    assert entry["reply"] == "" and "maximum context length" in entry["error"]
    assert rec["extracted"] is None and not rec["correct"]  # "" is no float


def test_concurrency_is_bounded_and_the_key_and_cap_are_sent(stub, monkeypatch):
    slow = stub(lambda body, attempt: (200, completion("x"), {}, 0.5))
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    judge = ask(slow.url, n=6, concurrency=2, key_env="JUDGE_TEST_KEY", max_tokens=4)
    assert judge.sent == 6 and slow.most_in_flight == 2
    assert {h.get("authorization") for h in slow.headers} == {"Bearer sk-test"}
    assert {r["max_completion_tokens"] for r in slow.requests} == {4}
    ask(slow.url, n=6, concurrency=8)
    assert slow.most_in_flight > 2
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(EvalError, match="--judge-key-env JUDGE_TEST_KEY: the environment"):
        Judge("m", slow.url, key_env="JUDGE_TEST_KEY")


def test_judge_flags_are_checked(fixture_root, tmp_path):
    for argv, msg in [
        (["--judge-url", "http://127.0.0.1:1/v1"], "--judge-url needs --judge-model"),
        (["--judge-model", "m"], "--judge-model needs --judge-url for a run"),
        (["--judge-key-env", "X", "--judge-model", "m", "--judge-url", "u"], "X: the environ"),
        (["--judge-model", "m", "--judge-url", "u", "--judge-concurrency", "0"], "out of range"),
    ]:
        args = eval_args(
            "--model", "m", "--benchmarks", "mathvista", "--data-dir", str(fixture_root),
            "--output", str(tmp_path), *argv,
        )  # fmt: skip
        with pytest.raises(EvalError, match=msg):
            main_eval(args, runtime_factory=lambda a: pytest.fail("loaded a model"))
