"""The generation server's HTTP side and its transactions, on the real app (Starlette under
uvicorn, ``opsd_mm.rollout.server``) around a fake engine (tests/rollout/conftest.py): the
token before the body, the body cap, stalled and surplus connections, client mistakes as 400
with the reason, the run claim, weight sets checked before loading, and a failed reload that
makes the server say so instead of serving half-loaded weights. The same behaviours against
the real vLLM server: tests/vllm/test_vllm_server_hardening.py."""

from __future__ import annotations

import base64
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import torch

from opsd_mm.rollout.server import Limits
from opsd_mm.rollout.service import ClaimConflict, ClientError, RunClaims
from opsd_mm.rollout.shared import CLAIM_HEADER, RUN_HEADER
from opsd_mm.testing.server import http_json
from opsd_mm.testing.server import raw_exchange as _raw_exchange

GUARD_S = 60.0  # a hang guard, never a timing assertion


def _address(url):
    parts = urlsplit(url)
    return parts.hostname, parts.port


def request(url, path, body=None, *, method="POST", claim="run-a", label="", headers=None):
    """(status, JSON reply) of one request naming ``claim``."""
    h = {CLAIM_HEADER: claim, RUN_HEADER: label, **(headers or {})}
    return http_json(url, path, body, method=method, headers=h, timeout=GUARD_S)


def raw_exchange(url, head: bytes, body: bytes = b""):
    return _raw_exchange(url, head + body, timeout=GUARD_S)


GOOD = {
    "prompts": [{"input_ids": [3, 4, 5], "key": "a"}],
    "n": 2,
    "sampling": {"temperature": 1.0, "max_new_tokens": 4, "seed": 1},
    "eos_token_ids": [1],
}


# ----------------------------------------------------------------------------- token, body


def test_token_is_checked_before_the_body_is_read(serve_fake):
    """An unauthenticated POST that declares 400 MB and sends none of it: answered 401 at once
    and its connection closed (the old server read the body first: this waited for 400 MB)."""
    _, url = serve_fake(token="right")
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 400000000\r\n\r\n"
    )
    status, data = raw_exchange(url, head)
    assert status == 401 and b"bearer token" in data
    assert b"connection: close" in data.lower()
    # The right token works, on every route including /health.
    assert (
        request(url, "/health", method="GET", headers={"Authorization": "Bearer right"})[0] == 200
    )
    assert request(url, "/health", method="GET")[0] == 401


def test_body_over_the_cap_is_refused_as_declared_and_as_streamed(serve_fake):
    _, url = serve_fake(limits=Limits(max_body_bytes=100_000))
    declared = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nOpsd-Claim: a\r\nContent-Length: 100001\r\n\r\n"
    )
    status, data = raw_exchange(url, declared)
    assert status == 413 and b"--max-body-mb" in data
    # Chunked, so nothing is declared: refused once the bytes read pass the cap.
    chunk = b"x" * 40_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))
    head = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nOpsd-Claim: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    status, data = raw_exchange(url, head, chunked)
    assert status == 413
    # Under the cap, the request goes through.
    assert request(url, "/generate", GOOD, claim="a")[0] == 200


def test_stalled_body_and_half_sent_heads_are_closed(serve_fake):
    """A body that stops coming is answered 408; connections whose request head never
    completes are closed by the server (the old server held a thread for each, for good)."""
    _, url = serve_fake(limits=Limits(idle_timeout_s=1.0))
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nOpsd-Claim: a\r\nContent-Length: 1000\r\n\r\n"
    status, _ = raw_exchange(url, head, b'{"prompts": [')
    assert status == 408
    sockets = [socket.create_connection(_address(url), timeout=GUARD_S) for _ in range(5)]
    for s in sockets:
        s.sendall(b"POST /gener")
    for s in sockets:
        assert s.recv(1024) == b""  # closed by the server (the guard raises on a hang)
        s.close()
    assert request(url, "/health", method="GET")[0] == 200


def test_connections_past_the_limit_are_answered_503(serve_fake):
    _, url = serve_fake(limits=Limits(max_connections=4))
    idle = [socket.create_connection(_address(url), timeout=GUARD_S) for _ in range(4)]
    for s in idle:
        s.sendall(b"GET /hea")
    try:
        assert request(url, "/health", method="GET")[0] == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + GUARD_S
    while request(url, "/health", method="GET")[0] != 200:  # the closes reach the server
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ----------------------------------------------------------------------------- client mistakes


def _png() -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _with(path, value):
    body = json.loads(json.dumps(GOOD))
    *parents, last = path
    node = body
    for p in parents:
        node = node[p]
    node[last] = value
    return body


MISTAKES = [
    ("/generate", _with(("sampling", "top_p"), 0.0), "sampling.top_p"),
    ("/generate", _with(("sampling", "top_k"), 33), "top_k=33 is over the vocabulary"),
    ("/generate", _with(("sampling", "max_new_tokens"), 0), "sampling.max_new_tokens"),
    ("/generate", _with(("sampling", "seed"), "7"), "sampling.seed"),
    ("/generate", _with(("n",), 0), "n: Input should be greater than or equal to 1"),
    ("/generate", _with(("prompts", 0, "input_ids"), [3, 32]), "token id 32 is outside"),
    ("/generate", _with(("prompts", 0, "input_ids"), [-1]), "token id -1 is outside"),
    ("/generate", _with(("prompts", 0, "input_ids"), []), "prompts.0.input_ids"),
    ("/generate", _with(("eos_token_ids",), [99]), "eos_token_ids: token id 99"),
    ("/generate", _with(("prompts", 0, "images"), ["!!"]), "takes no images"),
    ("/generate", {**GOOD, "extra": 1}, "extra: Extra inputs are not permitted"),
    ("/score", {"rows": [{"input_ids": [3, 4], "start": 1}], "top_k": 5}, "--max-logprobs=4"),
    ("/score", {"rows": [{"input_ids": [3, 4], "start": 2}]}, "rows[0].start=2 is past"),
    ("/update_weights", {"path": "/tmp"}, "version: Field required"),
    ("/update_weights", {"transport": "group", "version": 1}, "no weight group"),
    ("/update_weights", {"path": "/nonexistent-dir", "version": 1}, "does not exist"),
    ("/update_adapter", {"path": "/etc", "version": 1}, "no peft adapter"),
    (
        "/init_weight_group",
        {"host": "127.0.0.1", "port": 9, "backend": "gloo", "timeout_s": 1e9, "secret": "0" * 64},
        "timeout_s: Input should be less than or equal to 3600",
    ),
    (
        "/init_weight_group",
        {"host": "127.0.0.1", "port": 9, "backend": "gloo", "timeout_s": 5, "secret": "short"},
        "secret: String should match pattern",
    ),
]


@pytest.mark.parametrize(("path", "body", "reason"), MISTAKES)
def test_client_mistakes_are_400_with_the_reason(serve_fake, path, body, reason):
    service, url = serve_fake()
    status, reply = request(url, path, body)
    assert status == 400, reply
    assert reason in reply["error"], reply
    assert service.engine.loads == 0 and service.unhealthy is None


def test_nan_temperature_and_bad_images_are_400(serve_fake):
    service, url = serve_fake()
    nan = json.dumps(GOOD).replace('"temperature": 1.0', '"temperature": NaN').encode()
    status, reply = request(url, "/generate", nan)
    assert status == 400 and "sampling.temperature" in reply["error"]
    service.engine.accepts_images = True
    for image, why in (("not base64!", "not base64"), ("aGVsbG8=", "not a readable image")):
        body = _with(("prompts", 0, "images"), [_png(), image])
        status, reply = request(url, "/generate", body)
        assert status == 400 and "prompts[0].images[1]: " + why in reply["error"], reply
    assert request(url, "/generate", _with(("prompts", 0, "images"), [_png()]))[0] == 200


# ----------------------------------------------------------------------------- weight sets


def _save(directory, tensors):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return str(directory)


def test_weight_sets_are_checked_before_anything_loads(serve_fake, tmp_path, reference):
    service, url = serve_fake()
    full = {n: torch.ones(s) for n, _, s in reference}
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\x10\x00" * 50)
    cases = [
        (str(tmp_path / "empty"), "no *.safetensors in"),
        (str(tmp_path / "junk"), "not a readable safetensors file"),
        (_save(tmp_path / "one", {"lm_head.weight": torch.ones(32, 4)}), "2 of the engine's 3"),
        (_save(tmp_path / "extra", {**full, "x.weight": torch.ones(2)}), "the engine does not"),
        (_save(tmp_path / "shape", {**full, "lm_head.weight": torch.ones(4, 4)}), "shape"),
        (
            _save(tmp_path / "dtype", {**full, "lm_head.weight": torch.ones(32, 4).long()}),
            "another kind of dtype",
        ),
    ]
    for path, reason in cases:
        status, reply = request(url, "/update_weights", {"path": path, "version": 5})
        assert status == 400 and reason in reply["error"], (path, reply)
        assert "nothing loaded" in reply["error"]
    assert service.engine.loads == 0
    assert request(url, "/health", method="GET")[1]["weight_version"] == 0
    status, reply = request(
        url, "/update_weights", {"path": _save(tmp_path / "ok", full), "version": 5}
    )
    assert status == 200 and reply["weight_version"] == 5 and reply["weight_claim"] == "run-a"
    assert service.engine.loads == 3


def test_failed_reload_marks_the_server_unhealthy_until_a_good_one(serve_fake, tmp_path, reference):
    """A reload that fails part-way answers 500 with the reason; then /health is 503 and says
    why, /generate and /score refuse (503) instead of sampling from half-loaded weights; the
    next complete reload makes it healthy again."""
    service, url = serve_fake()
    path = _save(tmp_path / "w", {n: torch.full(s, 2.0) for n, _, s in reference})
    service.engine.fail_after = 1
    status, reply = request(url, "/update_weights", {"path": path, "version": 1})
    assert status == 500 and "failed part-way" in reply["error"] and "torn file" in reply["error"]
    status, health = request(url, "/health", method="GET")
    assert status == 503 and health["ok"] is False and "failed part-way" in health["error"]
    assert health["weight_version"] == 0
    assert request(url, "/generate", GOOD)[0] == 503
    assert request(url, "/score", {"rows": [{"input_ids": [3, 4], "start": 1}]})[0] == 503
    status, reply = request(url, "/update_weights", {"path": path, "version": 2})
    assert status == 200 and reply["weight_version"] == 2
    assert request(url, "/health", method="GET")[1]["ok"] is True
    status, reply = request(url, "/generate", GOOD)
    assert status == 200 and reply["rollouts"][0][0]["completion_ids"] == [3, 256 % 32]


# ----------------------------------------------------------------------------- the run claim


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_run_claims():
    clock = Clock()
    claims = RunClaims(lease_s=60, clock=clock)
    assert claims.admit("a", "run A") is None  # a free server: taken
    clock.t = 59
    assert claims.admit("a", "") is None  # the holder, renewed
    clock.t = 100
    with pytest.raises(ClaimConflict, match=r"in use by run A \(last request 41 s ago"):
        claims.admit("b", "run B")
    assert claims.admit("b", "run B", takeover=True) == "run A"
    with pytest.raises(ClaimConflict, match="taken over by run B"):
        claims.admit("a", "run A")  # for good, even once the server is free again
    clock.t = 161
    assert claims.admit("c", "run C") == "run B"  # B's claim lapsed: C may take it
    assert not claims.release("b") and claims.release("c") and claims.holder is None
    assert claims.admit("c", "run C") is None  # released, not taken: may claim again
    with pytest.raises(ClientError, match="Opsd-Claim header"):
        claims.admit("", "x")


def test_second_client_is_refused_until_the_first_releases(serve_fake):
    service, url = serve_fake()
    assert request(url, "/claim", {}, claim="a", label="run A")[0] == 200
    status, reply = request(url, "/generate", GOOD, claim="b", label="run B")
    assert status == 409 and "in use by run A" in reply["error"]
    assert "rollout.server_takeover=true" in reply["error"]
    health = request(url, "/health", method="GET")[1]
    assert health["claimed_by"] == "run A"
    assert request(url, "/generate", GOOD, claim="")[0] == 400  # no claim header at all
    assert request(url, "/release", {}, claim="a")[1]["released"] is True
    assert request(url, "/generate", GOOD, claim="b", label="run B")[0] == 200
    assert request(url, "/health", method="GET")[1]["claimed_by"] == "run B"
