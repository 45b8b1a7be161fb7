"""`opsd-mm serve` (this, the vLLM environment) probed as a careless or hostile client would,
over loopback only, one test per failure of issue 25 (items 1-6): failed weight reloads, the
weight group's store and joiners, the token before the body and the body cap, two trainers on
one server, the weight group's join beside generation, and client mistakes. The same
behaviours around a fake engine, in the main environment: tests/rollout/test_server_app.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from opsd_mm.rollout.shared import CLAIM_HEADER, RUN_HEADER
from opsd_mm.testing.server import (
    LOOPBACK_V4,
    ServerProcess,
    http_json,
    listening_sockets,
    raw_exchange,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKEN = "s3cret-token"
GUARD_S = 120.0  # a hang guard, never a timing assertion
VOCAB = 1472  # the tiny text model's


@pytest.fixture(scope="module")
def srv(tiny_text_dir):
    """A server with a token, a 1 MiB body cap and a 2 s idle timeout."""
    server = ServerProcess(
        tiny_text_dir,
        extra_args=["--token", TOKEN, "--max-body-mb", "1", "--idle-timeout-s", "2"],
    )
    server.start()
    yield server
    server.stop()


def call(srv, path, body=None, *, claim="probe", method="POST", token=TOKEN, timeout=GUARD_S):
    headers = {CLAIM_HEADER: claim, RUN_HEADER: f"test {claim}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return http_json(srv.url, path, body, method=method, headers=headers, timeout=timeout)


def greedy(srv, claim="probe"):
    body = {
        "prompts": [{"input_ids": [5, 6, 7, 8], "key": "a"}, {"input_ids": [9, 10], "key": "b"}],
        "n": 1,
        "sampling": {"temperature": 0.0, "max_new_tokens": 8},
        "eos_token_ids": [0],
    }
    return call(srv, "/generate", body, claim=claim)


@pytest.fixture
def released(srv):
    """Each test starts and ends with the server free (its claims released)."""
    yield
    for claim in ("probe", "other"):
        call(srv, "/release", {}, claim=claim)


# ----------------------------------------------------------------------------- item 3


def test_token_before_the_body_the_body_cap_and_stalled_connections(srv, released):
    """An unauthenticated POST declaring 400 MB is answered 401 before a byte of it is sent;
    authenticated bodies over --max-body-mb are 413 (declared, or streamed in chunks); a
    request without a claim is 400; 300 half-sent request heads cost no thread each, push the
    connections past the limit (503) and are closed by the server."""
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 400000000\r\n\r\n"
    status, reply = raw_exchange(srv.url, head, timeout=GUARD_S)
    assert status == 401 and b"connection: close" in reply.lower()
    auth = f"Authorization: Bearer {TOKEN}\r\n{CLAIM_HEADER}: probe\r\n".encode()
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 2000000\r\n\r\n"
    status, reply = raw_exchange(srv.url, head, timeout=GUARD_S)
    assert status == 413 and b"--max-body-mb" in reply
    chunk = b"[" * 300_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4))
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
    assert raw_exchange(srv.url, head + chunked, timeout=GUARD_S)[0] == 413
    assert call(srv, "/generate", {}, claim="")[0] == 400  # no Opsd-Claim header
    import socket

    host, port = srv.url.rsplit("/", 1)[1].split(":")
    threads = _threads(srv.proc.pid)
    stalled = [socket.create_connection((host, int(port)), timeout=GUARD_S) for _ in range(300)]
    for s in stalled:
        s.sendall(b"POST /generate HTTP/1.1\r\nContent-Le")
    # Answered after the 300 were accepted: past --max-connections (64), 503.
    assert call(srv, "/health", method="GET")[0] == 503
    assert _threads(srv.proc.pid) - threads < 30  # the old server held a thread for each
    for s in stalled:
        assert s.recv(1024) == b""  # closed by the server after --idle-timeout-s
        s.close()
    assert call(srv, "/health", method="GET")[0] == 200


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


# ----------------------------------------------------------------------------- item 1


def _one_of_25(tiny_text_dir, out: Path) -> str:
    from safetensors.torch import load_file, save_file

    (weights,) = [load_file(f) for f in sorted(Path(tiny_text_dir).glob("*.safetensors"))]
    assert len(weights) == 25
    out.mkdir()
    save_file({"model.norm.weight": weights["model.norm.weight"]}, str(out / "model.safetensors"))
    return str(out)


def _torn_group_sync(srv, model, stop_after: int) -> tuple[int, dict]:
    """Play a trainer whose weight send breaks off after ``stop_after`` tensors (it died, or
    its disk failed): the group formed over /init_weight_group, the manifest complete and
    right, then an abort. Returns the server's reply to the sync."""
    from opsd_mm.rollout.shared import iter_sync_weights, sync_manifest
    from opsd_mm.rollout.transport import (
        close_group,
        host_store,
        new_secret,
        open_group,
        send_weights,
    )

    store, secret = host_store("127.0.0.1", 0, 60), new_secret()
    port, joined = store.port, {}
    thread = threading.Thread(
        target=lambda st: joined.update(
            group=open_group("127.0.0.1", port, 0, "gloo", 60, secret=secret, store=st)
        ),
        args=(store,),
    )
    del store
    thread.start()
    body = {"host": "127.0.0.1", "port": port, "backend": "gloo", "timeout_s": 60, "secret": secret}
    assert call(srv, "/init_weight_group", body)[0] == 200
    thread.join(GUARD_S)
    group = joined["group"]

    def torn():
        for i, item in enumerate(iter_sync_weights(model)):
            if i == stop_after:
                raise OSError("the trainer's disk failed")
            yield item

    def send():
        try:
            send_weights(group, sync_manifest(model), torn(), torch.device("cpu"))
        except OSError:
            pass

    sender = threading.Thread(target=send)
    sender.start()
    reply = call(srv, "/update_weights", {"transport": "group", "version": 1})
    sender.join(GUARD_S)
    close_group(group)
    return reply


def test_failed_reloads_then_a_good_one_serves_generations(srv, released, tiny_text_dir, tmp_path):
    """Refused sets (an empty directory, /etc, a missing path, 1 of the 25 tensors) are 400 and
    touch nothing: same version, same greedy completions. A reload that breaks off part-way is
    500 with the reason; /health then says the weights are incomplete (503) and /generate
    refuses (503: never a hang, never completions from half-loaded weights); a complete reload
    makes the server healthy and its completions the checkpoint's again."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    status, before = greedy(srv)
    assert status == 200, before
    (tmp_path / "empty").mkdir()
    refused = [
        (str(tmp_path / "empty"), "no *.safetensors in"),
        ("/etc", "no *.safetensors in /etc"),
        (str(tmp_path / "missing"), "does not exist"),
        (_one_of_25(tiny_text_dir, tmp_path / "one"), "24 of the engine's 25 weights missing"),
    ]
    for path, reason in refused:
        status, reply = call(srv, "/update_weights", {"path": path, "version": 9})
        assert status == 400 and reason in reply["error"], (path, reply)
        assert "nothing loaded" in reply["error"]
        health = call(srv, "/health", method="GET")[1]
        assert health["ok"] and health["weight_version"] == 0, health
        assert greedy(srv)[1]["rollouts"] == before["rollouts"]

    model = AutoModelForCausalLM.from_pretrained(str(tiny_text_dir), dtype=torch.float32)
    status, reply = _torn_group_sync(srv, model, stop_after=5)
    assert status == 500 and "failed part-way" in reply["error"], reply
    assert "the trainer's disk failed" in reply["error"]
    status, health = call(srv, "/health", method="GET")
    assert status == 503 and health["ok"] is False and "failed part-way" in health["error"]
    status, reply = greedy(srv)
    assert status == 503 and "weights are incomplete" in reply["error"]

    good = tmp_path / "good"
    good.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(good / "m.safetensors")
    )
    status, reply = call(srv, "/update_weights", {"path": str(good), "version": 2})
    assert status == 200 and reply["weight_version"] == 2, reply
    assert call(srv, "/health", method="GET")[1]["ok"] is True
    status, after = greedy(srv)
    assert status == 200 and after["rollouts"] == before["rollouts"]


# ----------------------------------------------------------------------------- item 2


def test_weight_group_store_on_the_host_only_and_joiners_proving_the_secret(
    srv, released, tiny_text_dir, tmp_path
):
    """A gloo sync through the real client: the trainer's store listened on 127.0.0.1 only
    (read from the kernel) and is closed once the group formed; every socket the server
    listens on is on 127.0.0.1. A rank 0 that does not hold the secret the server was given is
    refused by the server (400), and refuses it in turn: nothing is sent."""
    from transformers import AutoModelForCausalLM

    from opsd_mm.rollout.client import ServerEngine
    from opsd_mm.rollout.transport import GroupAuthError, host_store, new_secret, open_group

    model = AutoModelForCausalLM.from_pretrained(str(tiny_text_dir), dtype=torch.float32)
    before = set(listening_sockets())
    with ServerEngine(srv.url, tmp_path, eos_token_ids=[0], token=TOKEN, transport="gloo") as e:
        e.sync_weights(model, version=1)
        assert e.group is not None
        opened = set(listening_sockets()) - before  # gloo's listener; the store is closed
        assert all(a.startswith(LOOPBACK_V4) for a in opened), opened
        server_side = listening_sockets(srv.proc.pid)
        assert server_side and all(a.startswith(LOOPBACK_V4) for a in server_side), server_side
        assert greedy(srv, claim=e.claim_id)[0] == 200

    store = host_store("127.0.0.1", 0, 60)
    port = store.port
    assert listening_sockets(port=port) == [f"{LOOPBACK_V4}:{port:04X}"]
    joined = {}

    def join(st):
        try:
            open_group("127.0.0.1", port, 0, "gloo", 60, secret=new_secret(), store=st)
        except GroupAuthError as err:
            joined["refused"] = str(err)

    thread = threading.Thread(target=join, args=(store,))
    del store
    thread.start()
    body = {
        "host": "127.0.0.1",
        "port": port,
        "backend": "gloo",
        "timeout_s": 60,
        "secret": new_secret(),
    }
    status, reply = call(srv, "/init_weight_group", body)
    thread.join(GUARD_S)
    assert status == 400 and "refused" in reply["error"] and "secret" in reply["error"], reply
    assert "does not hold the group's secret" in joined["refused"]
    assert listening_sockets(port=port) == []


# ----------------------------------------------------------------------------- item 4


def test_a_second_trainer_is_refused_until_the_first_releases(
    srv, released, tiny_cache, tiny_text_dir, tmp_path, train_via_server
):
    """A trainer holds the server (an engine built, weights synced); a second training run is
    refused before step 1, naming the first and the way out; once the first releases, the
    second trains, and releases the server when it ends."""
    from transformers import AutoModelForCausalLM

    from opsd_mm.rollout.client import ServerEngine

    model = AutoModelForCausalLM.from_pretrained(str(tiny_text_dir), dtype=torch.float32)
    first = ServerEngine(srv.url, tmp_path / "a", eos_token_ids=[0], token=TOKEN, label="run A")
    first.sync_weights(model, version=0)
    token = f"rollout.server_token={TOKEN}"
    run = train_via_server(tmp_path / "b", tiny_cache, srv.url, token)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "in use by run A" in run.stderr and "rollout.server_takeover=true" in run.stderr
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    assert call(srv, "/health", method="GET")[1]["claimed_by"] == "run A"
    first.release()
    run = train_via_server(tmp_path / "c", tiny_cache, srv.url, token)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()) == 3
    assert call(srv, "/health", method="GET")[1]["claimed_by"] is None  # released at the end


# ----------------------------------------------------------------------------- item 5


def test_weight_group_join_does_not_hold_up_generation(srv, released):
    """/init_weight_group towards a store whose rank 0 never comes: while the server waits in
    the join, /generate is answered (the join holds no engine lock; it used to, and generation
    waited for the whole timeout). The join then fails with the reason. A timeout over the
    bound is refused."""
    from opsd_mm.rollout.transport import host_store, new_secret

    store = host_store("127.0.0.1", 0, 60)
    body = {
        "host": "127.0.0.1",
        "port": store.port,
        "backend": "gloo",
        "timeout_s": 30,
        "secret": new_secret(),
    }
    keys = store.num_keys()
    result = {}
    joining = threading.Thread(
        target=lambda: result.update(reply=call(srv, "/init_weight_group", body))
    )
    joining.start()
    deadline = time.monotonic() + GUARD_S
    while store.num_keys() == keys:  # the server has reached the store: it is in the join
        assert time.monotonic() < deadline and joining.is_alive(), result
        time.sleep(0.05)
    status, reply = greedy(srv)
    assert status == 200, reply
    assert joining.is_alive(), "the join returned before generation: it was not in progress"
    del store  # the rank 0 that never came goes away
    joining.join(GUARD_S)
    status, reply = result["reply"]
    assert status == 400 and "not joined" in reply["error"], reply
    for timeout_s in (1e9, -1, 0):
        status, reply = call(srv, "/init_weight_group", {**body, "timeout_s": timeout_s})
        assert status == 400 and "timeout_s" in reply["error"], reply


# ----------------------------------------------------------------------------- item 6


GOOD = {
    "prompts": [{"input_ids": [5, 6, 7], "key": "a"}],
    "n": 1,
    "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 4, "seed": 3},
    "eos_token_ids": [0],
}


def _generate(**change) -> dict:
    body = json.loads(json.dumps(GOOD))
    for key, value in change.items():
        if key in body["sampling"]:
            body["sampling"][key] = value
        elif key == "input_ids":
            body["prompts"][0]["input_ids"] = value
        else:
            body["prompts"][0][key] = value
    return body


def test_client_mistakes_are_400_with_the_reason(
    srv, released, tiny_cache, tmp_path, train_via_server
):
    """Each used to be a 500 with a traceback in the server's log. And a trainer without the
    token is told that the server refused it (it used to hear "no generation server")."""
    nan = json.dumps(GOOD).replace('"temperature": 1.0', '"temperature": NaN').encode()
    mistakes = [
        (nan, "sampling.temperature"),
        (_generate(top_p=0.0), "sampling.top_p"),
        (_generate(top_k=VOCAB + 1), f"over the vocabulary ({VOCAB})"),
        (_generate(input_ids=[5, VOCAB]), f"token id {VOCAB} is outside the vocabulary"),
        (_generate(images=["aGVsbG8="]), "takes no images"),
        (_generate(max_new_tokens=10_000), "max_new_tokens=10000"),
    ]
    for body, reason in mistakes:
        status, reply = call(srv, "/generate", body)
        assert status == 400 and reason in reply["error"], (body, reply)
    status, reply = call(
        srv, "/score", {"rows": [{"input_ids": [5, 6, 7], "start": 1}], "top_k": 65}
    )
    assert status == 400 and "--max-logprobs=64" in reply["error"], reply
    assert call(srv, "/health", method="GET")[1]["ok"] is True
    assert call(srv, "/generate", GOOD)[0] == 200
    call(srv, "/release", {})

    run = train_via_server(tmp_path, tiny_cache, srv.url, "rollout.server_token=wrong")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "refused the token" in run.stderr and "rollout.server_token" in run.stderr
    assert "no generation server" not in run.stderr
