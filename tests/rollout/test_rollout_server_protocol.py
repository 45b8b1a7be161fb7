"""Protocol-level fault injection for the vllm_server client against a FAKE HTTP server (no
vLLM). These are in addition to the real-server tests in tests/vllm/test_vllm_server.py: they
cover what a real server cannot be made to do on cue (a reply slower than the timeout, a boot id
that changes between two calls), plus the token check and the loopback rule. The client against
the real server app (around a fake engine): the run claim, the token, the weight version."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from opsd_mm.errors import UserError
from opsd_mm.rollout.client import ServerEngine, ServerError
from opsd_mm.rollout.server import check_bind
from opsd_mm.rollout.shared import save_sync_weights
from opsd_mm.types import Prompt, SamplingConfig


class Fake:
    """Scripted server state: ``boots`` is consumed one per /generate (the boot id it reports),
    ``slow`` the number of /generate calls that sleep past the client's timeout."""

    def __init__(self) -> None:
        self.boot = "boot-1"
        self.boot_after_generate: list[str] = []
        self.slow = 0
        self.calls: list[tuple[str, dict]] = []
        self.version = 0  # the weight version it holds
        self.boot_after_score: list[str] = []
        self.claim = None  # the claim that loaded the weights held

    def reply(self, path: str, body: dict, claim: str) -> dict:
        self.calls.append((path, body))
        if path == "/health":
            return {"ok": True, "boot_id": self.boot, "weight_version": 0}
        if path in ("/claim", "/release"):
            return {"ok": True, "boot_id": self.boot, "lease_s": 60.0}
        if path == "/generate":
            if self.slow:
                self.slow -= 1
                time.sleep(0.6)
            if self.boot_after_generate:
                self.boot = self.boot_after_generate.pop(0)
            rollouts = [
                # a function of the request alone
                [{"completion_ids": [len(p["input_ids"]), 2], "finish_reason": "eos"}] * body["n"]
                for p in body["prompts"]
            ]
            return {
                "rollouts": rollouts,
                "boot_id": self.boot,
                "weight_version": self.version,
                "weight_claim": self.claim,
            }
        if path == "/score":
            if self.boot_after_score:
                self.boot = self.boot_after_score.pop(0)
            scores = [  # a function of the request and the weights held
                {"logprobs": [-float(self.version)] * (len(r["input_ids"]) - r["start"])}
                for r in body["rows"]
            ]
            return {
                "scores": scores,
                "boot_id": self.boot,
                "weight_version": self.version,
                "weight_claim": self.claim,
            }
        self.version, self.claim = body.get("version"), claim
        return {"boot_id": self.boot, "seconds": 0.0, "weight_version": self.version}


@pytest.fixture
def fake():
    state = Fake()

    class Handler(BaseHTTPRequestHandler):
        def _do(self):
            if self.headers.get("Authorization") not in (None, "Bearer right"):
                self.send_response(401)
                self.end_headers()
                return
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else {}
            data = json.dumps(state.reply(self.path, body, self.headers["Opsd-Claim"])).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _do

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def _engine(fake, tmp_path, **kw):
    kw = {"timeout_s": 0.3, "retries": 2, "backoff_s": 0.0, **kw}
    return ServerEngine(fake.url, tmp_path / "sync", eos_token_ids=[1], **kw)


PROMPTS = [Prompt(input_ids=[5, 6, 7], meta={"key": "a"})]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=4, seed=11)


def test_fake_timeout_retried_with_the_same_request(fake, tmp_path):
    engine = _engine(fake, tmp_path)
    fake.slow = 1
    out = engine.generate(PROMPTS, 2, SAMPLING)
    assert [(r.completion_ids, r.logprobs) for r in out[0]] == [([3, 2], None)] * 2
    assert [r.completion_ids for r in out[0]] == [[3, 2], [3, 2]]
    gens = [b for p, b in fake.calls if p == "/generate"]
    assert len(gens) == 2 and gens[0] == gens[1]  # same seeds, keys and ids: same completions


def test_fake_timeouts_exhausted_is_a_clear_error(fake, tmp_path):
    engine = _engine(fake, tmp_path, retries=1)
    fake.slow = 5
    with pytest.raises(ServerError, match="failed 2 time"):
        engine.generate(PROMPTS, 1, SAMPLING)


def test_fake_restart_resyncs_and_regenerates(fake, tmp_path):
    engine = _engine(fake, tmp_path)
    engine.sync_weights(torch.nn.Linear(3, 2))
    fake.boot_after_generate = ["boot-2"]  # the server restarted before answering
    engine.generate(PROMPTS, 1, SAMPLING)
    paths = [p for p, _ in fake.calls]
    assert paths == [
        "/health",
        "/claim",
        "/update_weights",
        "/generate",
        "/update_weights",
        "/generate",
    ]
    assert engine.restarts == 1 and engine.boot_id == "boot-2"


def test_fake_restart_before_any_sync_keeps_the_completions(fake, tmp_path):
    engine = _engine(fake, tmp_path)
    fake.boot_after_generate = ["boot-2"]
    engine.generate(PROMPTS, 1, SAMPLING)
    assert [p for p, _ in fake.calls] == ["/health", "/claim", "/generate"]


def test_fake_token(fake, tmp_path):
    _engine(fake, tmp_path, token="right")
    with pytest.raises(ServerError, match="refused the token .HTTP 401.*rollout.server_token"):
        _engine(fake, tmp_path, token="wrong")


def test_unreachable_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="no generation server at http://127.0.0.1:9"):
        ServerEngine("http://127.0.0.1:9", tmp_path, eos_token_ids=[1], retries=0)


def test_non_loopback_needs_a_token():
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "t")
    with pytest.raises(UserError, match="--token"):
        check_bind("0.0.0.0", None)


def test_save_sync_weights_tied_and_sharded(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import opsd_mm.rollout.shared as rs

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    monkeypatch.setattr(rs, "SHARD_BYTES", 100)
    total = save_sync_weights(model, tmp_path)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and total == 2 * 10 * 4 * 4
    loaded = {k: v for f in files for k, v in load_file(f).items()}
    assert set(loaded) == {"0.weight", "1.weight"}
    torch.testing.assert_close(loaded["1.weight"], model[0].weight.detach())


SCORE_ROWS = [Prompt(input_ids=[5, 6, 7, 8, 9]), Prompt(input_ids=[5, 6, 7])]


def test_fake_score_restart_resyncs_and_rescores(fake, tmp_path):
    """teacher.scoring=server: a server that restarted (initial weights) before scoring gets
    the last synced weights again, and the rows are scored again under them."""
    engine = _engine(fake, tmp_path)
    engine.sync_weights(torch.nn.Linear(3, 2), version=4)
    fake.boot_after_score = ["boot-2"]
    fake.version = 0  # what a restarted server holds
    scores = engine.score(SCORE_ROWS, [2, 1], 0)
    paths = [p for p, _ in fake.calls]
    assert paths == ["/health", "/claim", "/update_weights", "/score", "/update_weights", "/score"]
    assert [s.logprobs for s in scores] == [[-4.0] * 3, [-4.0] * 2]
    assert scores[0].topk_ids is None and engine.restarts == 1


def test_fake_score_under_other_weights_is_refused(fake, tmp_path):
    """Another client reloaded the server's weights: a live teacher scored under them would
    not be the trained model, so the client stops."""
    engine = _engine(fake, tmp_path)
    engine.sync_weights(torch.nn.Linear(3, 2), version=2)
    fake.version = 7
    with pytest.raises(ServerError, match="weight version 7 .*last synced version 2"):
        engine.score(SCORE_ROWS, [2, 1], 0)


def test_fake_adapter_engine_sends_base_once_and_adapter_each_sync(fake, tmp_path):
    """teacher.kind=fixed on the server: the base goes once (and again to a restarted server,
    before its adapter), the peft adapter at every sync."""
    from peft import LoraConfig, get_peft_model

    from opsd_mm.rollout.client import AdapterServerEngine

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["proj"]))
    engine = AdapterServerEngine(
        fake.url, tmp_path / "sync", eos_token_ids=[1], timeout_s=0.3, retries=2, backoff_s=0.0
    )
    engine.sync_weights(model, version=0)
    engine.sync_weights(model, version=1)
    paths = [p for p, _ in fake.calls]
    assert paths == ["/health", "/claim", "/update_weights", "/update_adapter", "/update_adapter"]
    base = fake.calls[2][1]["path"]
    assert base.endswith("base") and list((tmp_path / "sync" / "base").glob("*.safetensors"))
    assert fake.calls[4][1] == {
        "path": str((tmp_path / "sync" / "adapter").resolve()),
        "version": 1,
    }
    assert (tmp_path / "sync" / "adapter" / "adapter_config.json").exists()
    fake.boot_after_score = ["boot-2"]
    engine.score(SCORE_ROWS, [2, 1], 0)
    assert [p for p, _ in fake.calls[5:]] == [
        "/score",
        "/update_weights",
        "/update_adapter",
        "/score",
    ]
    with pytest.raises(ServerError, match="model.lora.enabled"):
        engine.sync_weights(torch.nn.Linear(3, 2), version=2)


# ----------------------------------------------------------------------------- the real app


def _client(url, tmp_path, **kw):
    return ServerEngine(url, tmp_path / "sync", eos_token_ids=[1], retries=0, **kw)


def test_client_without_the_token_is_told_the_server_refused_it(serve_fake, tmp_path):
    """A 401 is not "no generation server": it says the token was refused, and where the
    trainer's token comes from."""
    from opsd_mm.rollout.shared import TOKEN_ENV

    _, url = serve_fake(token="right")
    for wrong in ("wrong", None):
        with pytest.raises(ServerError) as e:
            _client(url, tmp_path, token=wrong)
        assert "refused the token" in str(e.value) and "rollout.server_token" in str(e.value)
        assert TOKEN_ENV in str(e.value) and "no generation server" not in str(e.value)
    _client(url, tmp_path, token="right").release()


def test_second_trainer_is_refused_and_a_takeover_stops_the_first(serve_fake, tmp_path):
    _, url = serve_fake()
    first = _client(url, tmp_path, label="run A")
    first.generate(PROMPTS, 1, SAMPLING)
    with pytest.raises(ServerError, match="in use by run A .*rollout.server_takeover=true"):
        _client(url, tmp_path, label="run B")
    second = _client(url, tmp_path, label="run B", takeover=True)
    second.generate(PROMPTS, 1, SAMPLING)
    with pytest.raises(ServerError, match="taken over by run B"):
        first.generate(PROMPTS, 1, SAMPLING)
    second.release()
    with pytest.raises(ServerError, match="taken over by run B"):  # for good
        first.generate(PROMPTS, 1, SAMPLING)
    with _client(url, tmp_path, label="run C") as third:  # released: free for the next run
        third.generate(PROMPTS, 1, SAMPLING)


def test_reply_from_weights_this_client_did_not_load_is_refused(
    serve_fake, tmp_path, weights_model
):
    """Versions are step numbers, so two runs' step 3 would look alike: a reply also names the
    claim that loaded the weights, and the client refuses another's."""
    service, url = serve_fake()
    with _client(url, tmp_path) as engine:
        engine.sync_weights(weights_model, version=3)
        rollouts = engine.generate(PROMPTS, 1, SAMPLING)
        assert rollouts[0][0].weight_version == 3
        service.version_claim = "someone-else"  # what another client's reload would leave
        with pytest.raises(ServerError, match=r"weight version 3 \(another client's\)"):
            engine.generate(PROMPTS, 1, SAMPLING)
        service.version_claim, service.version_step = engine.claim_id, 4
        with pytest.raises(
            ServerError, match=r"weight version 4 \(this trainer's\).*synced version 3"
        ):
            engine.score(SCORE_ROWS, [2, 1], 0)


def test_heartbeat_keeps_a_quiet_run_claimed(serve_fake, tmp_path):
    """A run that sends nothing for longer than the lease (a long step) keeps the server: its
    heartbeat renews the claim. Stopped (a killed trainer), the claim lapses for the next run.
    The server's clock is a fake one, moved by hand; the heartbeat runs on the real one."""
    service, url = serve_fake(lease_s=0.4)  # the client beats every 0.1 s
    now = [1000.0]
    service.claims.clock = lambda: now[0]
    engine = _client(url, tmp_path, label="run A")
    for _ in range(3):
        now[0] += 0.3  # under the lease since the last renewal
        deadline = time.monotonic() + 60
        while service.claims.holder.seen != now[0]:  # wait for a heartbeat to arrive
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
    with pytest.raises(ServerError, match="in use by run A"):
        _client(url, tmp_path, label="run B")
    engine._heartbeat.set()  # as if the trainer died
    now[0] += 1.0
    _client(url, tmp_path, label="run B").release()


def test_a_resumed_run_waits_for_its_own_stale_claim(serve_fake, tmp_path, caplog):
    """A trainer killed without releasing its claim, resumed at once on the same run directory
    (a requeued job): the new process waits for the old claim to lapse and takes the server,
    instead of failing; another run is still refused at once; and a holder of the same run
    directory that stays alive (two trainers on one run directory) is refused after the wait."""
    service, url = serve_fake(lease_s=1.0)  # the client beats every 0.25 s
    first = _client(url, tmp_path, label="run A, pid 1", run="/runs/a")
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="in use by run A, pid 1") as refused:
        _client(url, tmp_path, label="run B", run="/runs/b")
    assert time.monotonic() - t0 < 1.0 and "this run directory" not in str(refused.value)
    first._heartbeat.set()  # killed: no heartbeat, no release
    with caplog.at_level(logging.WARNING, logger="opsd_mm.rollout.client"):
        second = _client(url, tmp_path, label="run A, pid 2", run="/runs/a")
    assert "still claimed by an earlier process of this run (/runs/a)" in caplog.text
    assert service.claims.holder.label == "run A, pid 2"
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="another trainer is running on this run directory"):
        _client(url, tmp_path, label="run A, pid 3", run="/runs/a")  # pid 2 is alive
    assert time.monotonic() - t0 >= 1.0  # it waited for the lease first
    second.release()


def test_request_over_the_body_cap_is_a_clear_client_error(serve_fake, tmp_path):
    from opsd_mm.rollout.server import Limits

    _, url = serve_fake(limits=Limits(max_body_bytes=2000))
    with _client(url, tmp_path) as engine:
        long = [Prompt(input_ids=list(range(2, 30)) * 40, meta={"key": "a"})]
        with pytest.raises(ServerError, match="over the server's cap.*--max-body-mb"):
            engine.generate(long, 1, SAMPLING)
        engine.generate(PROMPTS, 1, SAMPLING)


def test_group_transport_refuses_a_wrong_set_and_survives_a_torn_one(
    serve_fake, tmp_path, weights_model
):
    """The gloo transport end to end between the client and the real app (both in this
    process): a model that is not the engine's is refused from the manifest, nothing loaded,
    the group still aligned for the next sync; a sync that breaks off part-way leaves the
    server unhealthy until the next one, which the client's retry sends."""
    service, url = serve_fake()
    engine = _client(url, tmp_path, transport="gloo")
    try:
        engine.sync_weights(weights_model, version=1)
        assert service.engine.loads == 3 and service.version_step == 1
        wrong = torch.nn.Linear(4, 4)
        with pytest.raises(ServerError, match="HTTP 400.*3 of the engine's 3 weights missing"):
            engine.sync_weights(wrong, version=2)
        assert service.engine.loads == 3 and service.version_step == 1
        engine.retries = 1
        service.engine.fail_after = 1  # the first attempt breaks off; the retry is whole
        engine.sync_weights(weights_model, version=3)
        assert service.version_step == 3 and service.unhealthy is None
        assert service.engine.loads == 3 + 1 + 3
        engine.generate(PROMPTS, 1, SAMPLING)
    finally:
        engine.release()
