"""``opsd-mm serve MODEL``: the vLLM rollout engine behind a small HTTP server.

Why a server: colocated vLLM forces the trainer into vLLM's pinned torch/transformers (hence
the second virtual environment), serialises generation with training, and cannot put generation
on another device or machine. Started from the vLLM environment (``.venv-vllm/bin/opsd-mm
serve``), it lets the trainer run in its own environment and talk to it over HTTP
(``rollout.engine=vllm_server``, ``opsd_mm.rollout.client``).

The server wraps the colocated :class:`~opsd_mm.rollout.vllm_engine.VLLMEngine`, so seeding (one
request per (step seed, prompt key, sample) row), EOS handling, suppressed ids, raw log-probs,
weight reload and cache resets are the same code in both modes. Protocol (JSON over HTTP,
standard library only; every request carries ``Authorization: Bearer T`` when ``--token`` is
set):

- ``GET /health`` -> ``{"ok", "boot_id", "weight_version", "model", "max_model_len"}``;
  ``boot_id`` is new at every start, so a client notices a restart;
- ``POST /generate`` ``{"prompts": [{"input_ids", "key", "images": [base64 PNG]}], "n",
  "sampling": SamplingConfig fields, "eos_token_ids", "suppress_token_ids"}`` ->
  ``{"rollouts": [[{"completion_ids", "finish_reason", "logprobs"}]], "boot_id",
  "weight_version"}``;
- ``POST /update_weights`` ``{"path": DIR, "version": int}``: reload every weight from the
  safetensors in DIR (written by the trainer), then reset the caches -> ``{"seconds", ...}``;
  with ``{"transport": "group", "version": int}`` instead, receive them over the weight group;
- ``POST /init_weight_group`` ``{"host", "port", "backend": "gloo" | "nccl", "timeout_s"}``:
  join the trainer's two-process group for weight syncs (``opsd_mm.rollout.transport``);
- ``POST /reset_cache``;
- ``POST /score`` ``{"rows": [{"input_ids": teacher prompt + completion ids, "start": where the
  completion starts, "images": [base64 PNG]}], "top_k": k}`` -> ``{"scores": [{"logprobs",
  "topk_ids", "topk_logprobs"}], "boot_id", "weight_version"}``: the teacher's log-probs of each
  completion token, and (k > 0) its top-k, under the weights held (``teacher.scoring=server``,
  ``VLLMEngine.score``; k at most ``--max-logprobs``; a loaded adapter is not applied);
- ``POST /update_adapter`` ``{"path": DIR, "version": int}``: generate with the peft LoRA adapter
  in DIR from now on, the weights held staying the base that ``/score`` uses (a fixed LoRA
  teacher served as the base, ``VLLMEngine.load_adapter``; needs ``--max-lora-rank``).

Requests run one at a time (a lock around the engine); ``/health`` answers while a batch is
generating.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opsd_mm.errors import UserError
from opsd_mm.rollout.shared import TOKEN_ENV, decode_image

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class GenerationService:
    """The server's state: one engine, its boot id and the weight version it holds."""

    def __init__(self, engine: Any, model: str) -> None:
        self.engine = engine
        self.model = model
        self.boot_id = uuid.uuid4().hex
        self.weight_version = 0
        self.lock = threading.Lock()
        self.group: Any = None  # the trainer's weight group, once it asks (init_weight_group)
        self.group_device: Any = None

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "boot_id": self.boot_id,
            "weight_version": self.weight_version,
            "model": self.model,
            "max_model_len": self.engine.max_model_len,
        }

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        from opsd_mm.types import Prompt, SamplingConfig

        prompts = []
        for i, p in enumerate(body["prompts"]):
            images = [decode_image(x) for x in p.get("images", ())]
            prompts.append(
                Prompt(input_ids=list(p["input_ids"]), images=images, meta={"key": p.get("key", i)})
            )
        sampling = SamplingConfig(**body["sampling"])
        with self.lock:
            # Per request, as the colocated engine takes them from the processor.
            self.engine.eos_token_ids = list(body["eos_token_ids"])
            self.engine.suppress_token_ids = sorted(set(body.get("suppress_token_ids", ())))
            rollouts_P_G = self.engine.generate(prompts, int(body["n"]), sampling)
            version = self.weight_version
        return {
            "rollouts": [
                [
                    {
                        "completion_ids": r.completion_ids,
                        "finish_reason": r.finish_reason,
                        "logprobs": r.logprobs,
                    }
                    for r in rollouts
                ]
                for rollouts in rollouts_P_G
            ],
            "boot_id": self.boot_id,
            "weight_version": version,
        }

    def score(self, body: dict[str, Any]) -> dict[str, Any]:
        from opsd_mm.types import Prompt

        prompts, starts = [], []
        for i, row in enumerate(body["rows"]):
            images = [decode_image(x) for x in row.get("images", ())]
            prompts.append(Prompt(input_ids=list(row["input_ids"]), images=images, meta={"key": i}))
            starts.append(int(row["start"]))
        with self.lock:
            scores = self.engine.score(prompts, starts, int(body.get("top_k", 0)))
            version = self.weight_version
        return {
            "scores": [vars(s) for s in scores],
            "boot_id": self.boot_id,
            "weight_version": version,
        }

    def update_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if body.get("transport") == "group":
                seconds = self._receive_weights()
            else:
                seconds = self.engine.load_weights_from(str(body["path"]))
            self.weight_version = int(body.get("version", self.weight_version + 1))
        return {"seconds": seconds, "boot_id": self.boot_id, "weight_version": self.weight_version}

    def init_weight_group(self, body: dict[str, Any]) -> dict[str, Any]:
        """Join the trainer's two-process weight group (``opsd_mm.rollout.transport``) as rank
        1, replacing any earlier one. Returns once both sides are connected."""
        import torch

        from opsd_mm.rollout.transport import open_group

        backend = str(body["backend"])
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend nccl: this server has no CUDA device")
        with self.lock:
            self.group = None  # an earlier group's sockets close with it
            self.group = open_group(
                str(body["host"]), int(body["port"]), 1, backend, float(body["timeout_s"])
            )
            self.group_device = torch.device("cuda" if backend == "nccl" else "cpu")
        return {"ok": True, "boot_id": self.boot_id}

    def _receive_weights(self) -> float:
        """Load what the trainer broadcasts over the weight group. The stream is drained to its
        end marker even when the load fails, so the group stays aligned with the trainer's
        sends, and the failure is then reported."""
        from opsd_mm.rollout.transport import receive_weights

        if self.group is None:
            raise ValueError("no weight group: POST /init_weight_group first")
        stream = receive_weights(self.group, self.group_device)
        try:
            return self.engine.load_weights(stream)
        finally:
            for _ in stream:
                pass

    def update_adapter(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            seconds = self.engine.load_adapter(str(body["path"]))
            self.weight_version = int(body.get("version", self.weight_version + 1))
        return {"seconds": seconds, "boot_id": self.boot_id, "weight_version": self.weight_version}

    def reset_cache(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.engine.reset_caches()
        return {"ok": True, "boot_id": self.boot_id}


def make_handler(service: GenerationService, token: str | None) -> type[BaseHTTPRequestHandler]:
    routes = {
        ("GET", "/health"): lambda body: service.health(),
        ("POST", "/generate"): service.generate,
        ("POST", "/update_weights"): service.update_weights,
        ("POST", "/init_weight_group"): service.init_weight_group,
        ("POST", "/reset_cache"): service.reset_cache,
        ("POST", "/score"): service.score,
        ("POST", "/update_adapter"): service.update_adapter,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if token is not None:
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    self._reply(401, {"error": "missing or wrong bearer token"})
                    return
            route = routes.get((method, self.path.split("?", 1)[0]))
            if route is None:
                self._reply(404, {"error": f"no route {method} {self.path}"})
                return
            try:
                body = json.loads(raw) if raw else {}
                self._reply(200, route(body))
            except (KeyError, TypeError, ValueError) as e:
                self._reply(400, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # the engine's own failure: report it, keep serving
                log.exception("%s %s failed", method, self.path)
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

    return Handler


def check_bind(host: str, token: str | None) -> None:
    """Anything but loopback needs a shared token: the server runs arbitrary weight reloads."""
    if host not in LOOPBACK and not token:
        raise UserError(
            f"serve: --host {host} is not loopback; anyone who reaches it could generate and "
            f"replace the weights. Pass --token T (or set {TOKEN_ENV}) and give the trainer the "
            "same rollout.server_token"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from opsd_mm.config import RolloutConfig
    from opsd_mm.rollout.vllm_engine import VLLMEngine

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)
    model = args.model
    if model.startswith("tiny:"):
        from opsd_mm.model.tiny import resolve_tiny

        model = str(resolve_tiny(model.split(":", 1)[1], args.tiny_cache_dir))
    start = time.perf_counter()
    engine = VLLMEngine(
        model,
        RolloutConfig(engine="vllm", gpu_memory_utilization=args.gpu_memory_utilization),
        dtype=args.dtype,
        seed=args.seed,
        max_model_len=args.max_model_len,
        eos_token_ids=[-1],  # replaced by each request's
        llm_kwargs=_llm_kwargs(args),
        max_logprobs=args.max_logprobs,
    )
    service = GenerationService(engine, model)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(service, token))
    host, port = server.server_address[:2]
    # One parseable line: tests and scripts wait for it (and read the port when --port 0).
    print(
        f"serving {model} on http://{host}:{port} boot_id={service.boot_id} "
        f"(ready in {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
    return 0


def _llm_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--llm-kwargs``, with LoRA switched on by ``--max-lora-rank`` (one adapter at a time).

    LoRA goes on the decoder's (vLLM-packed) projections only, what ``model.lora`` targets: a
    LoRA-wrapped lm_head in vLLM 0.32 applies its delta per *sampled* token, so ``/score``'s
    prompt log-probs of a batch fail ("einsum(): subscript b has size 4 ... 181")."""
    kwargs = json.loads(args.llm_kwargs) if args.llm_kwargs else {}
    if args.max_lora_rank:
        kwargs = {
            "enable_lora": True,
            "max_lora_rank": args.max_lora_rank,
            "max_loras": 1,
            "lora_target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            **kwargs,
        }
    return kwargs or None


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve vLLM rollouts over HTTP (run from the vLLM environment)",
        description="A generation server for rollout.engine=vllm_server: token-id prompts in, "
        "completion ids and log-probs out; weight reloads from safetensors the trainer writes.",
    )
    serve.add_argument(
        "model",
        help="checkpoint directory, hub id, or tiny:NAME (tiny:text, tiny:qwen2-vl, tiny:qwen2.5-vl, tiny:qwen3-vl)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    serve.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    serve.add_argument(
        "--token",
        help=f"shared bearer token (or {TOKEN_ENV}); required when --host is not loopback",
    )
    serve.add_argument("--dtype", default="auto", help="weights dtype in vLLM (default auto)")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument(
        "--max-logprobs",
        type=int,
        default=64,
        help="largest teacher top-k /score returns (loss.top_k with teacher.scoring=server)",
    )
    serve.add_argument(
        "--max-lora-rank",
        type=int,
        default=0,
        help="serve a LoRA student adapter over the base weights (/update_adapter) up to this "
        "rank; the base then scores a fixed teacher (0: off)",
    )
    serve.add_argument("--llm-kwargs", help="JSON object passed to vllm.LLM last")
    serve.add_argument("--tiny-cache-dir", help="where tiny:* models are built (default cache)")
    serve.set_defaults(func=cmd_serve)
