"""Protocol-level fault injection for the vllm_server client against a FAKE HTTP server (no
vLLM). These are in addition to the real-server tests in tests/vllm/test_vllm_server.py: they
cover what a real server cannot be made to do on cue (a reply slower than the timeout, a boot id
that changes between two calls), plus the token check and the loopback rule."""

from __future__ import annotations

import json
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

    def reply(self, path: str, body: dict) -> dict:
        self.calls.append((path, body))
        if path == "/health":
            return {"ok": True, "boot_id": self.boot, "weight_version": 0}
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
            return {"rollouts": rollouts, "boot_id": self.boot}
        if path == "/score":
            if self.boot_after_score:
                self.boot = self.boot_after_score.pop(0)
            scores = [  # a function of the request and the weights held
                {"logprobs": [-float(self.version)] * (len(r["input_ids"]) - r["start"])}
                for r in body["rows"]
            ]
            return {"scores": scores, "boot_id": self.boot, "weight_version": self.version}
        self.version = body.get("version")
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
            data = json.dumps(state.reply(self.path, body)).encode()
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
    assert paths == ["/health", "/update_weights", "/generate", "/update_weights", "/generate"]
    assert engine.restarts == 1 and engine.boot_id == "boot-2"


def test_fake_restart_before_any_sync_keeps_the_completions(fake, tmp_path):
    engine = _engine(fake, tmp_path)
    fake.boot_after_generate = ["boot-2"]
    engine.generate(PROMPTS, 1, SAMPLING)
    assert [p for p, _ in fake.calls] == ["/health", "/generate"]


def test_fake_token(fake, tmp_path):
    _engine(fake, tmp_path, token="right")
    with pytest.raises(ServerError, match="HTTP 401"):
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
    assert paths == ["/health", "/update_weights", "/score", "/update_weights", "/score"]
    assert [s.logprobs for s in scores] == [[-4.0] * 3, [-4.0] * 2]
    assert scores[0].topk_ids is None and engine.restarts == 1


def test_fake_score_under_other_weights_is_refused(fake, tmp_path):
    """Another client reloaded the server's weights: a live teacher scored under them would
    not be the trained model, so the client stops."""
    engine = _engine(fake, tmp_path)
    engine.sync_weights(torch.nn.Linear(3, 2), version=2)
    fake.version = 7
    with pytest.raises(ServerError, match="weight version 7.*last synced version 2"):
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
    assert paths == ["/health", "/update_weights", "/update_adapter", "/update_adapter"]
    base = fake.calls[1][1]["path"]
    assert base.endswith("base") and list((tmp_path / "sync" / "base").glob("*.safetensors"))
    assert fake.calls[3][1] == {
        "path": str((tmp_path / "sync" / "adapter").resolve()),
        "version": 1,
    }
    assert (tmp_path / "sync" / "adapter" / "adapter_config.json").exists()
    fake.boot_after_score = ["boot-2"]
    engine.score(SCORE_ROWS, [2, 1], 0)
    assert [p for p, _ in fake.calls[4:]] == [
        "/score",
        "/update_weights",
        "/update_adapter",
        "/score",
    ]
    with pytest.raises(ServerError, match="model.lora.enabled"):
        engine.sync_weights(torch.nn.Linear(3, 2), version=2)
