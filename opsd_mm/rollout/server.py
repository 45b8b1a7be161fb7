"""``opsd-mm serve MODEL``: the vLLM rollout engine behind an HTTP server.

Why a server: colocated vLLM forces the trainer into vLLM's pinned torch/transformers (hence
the second virtual environment), serialises generation with training, and cannot put generation
on another device or machine. Started from the vLLM environment (``.venv-vllm/bin/opsd-mm
serve``), it lets the trainer run in its own environment and talk to it over HTTP
(``rollout.engine=vllm_server``, ``opsd_mm.rollout.client``).

The server wraps the colocated :class:`~opsd_mm.rollout.vllm_engine.VLLMEngine`, so seeding (one
request per (step seed, prompt key, sample) row), EOS handling, suppressed ids, raw log-probs,
weight reload and cache resets are the same code in both modes. What a request does lives in
``opsd_mm.rollout.service`` (the engine lock, the run claim, weight transactions); this module
is the HTTP side: an ASGI app (Starlette) under uvicorn, the stack vLLM itself ships, so the
connection limit and the keep-alive timeout are uvicorn's configuration. What uvicorn does not
bound, :class:`Guard` and :func:`protocol_class` do:

- the token is checked before a byte of the body is read: a request without it is answered 401
  and its connection closed (a 400 MB unauthenticated POST costs the server nothing);
- the body is read here, counted as it streams in, and refused with 413 past ``--max-body-mb``
  (uvicorn has no body limit) or with 408 when no byte arrives for ``--idle-timeout-s``;
- a connection must complete each request's head within ``--idle-timeout-s`` (uvicorn's
  ``timeout_keep_alive`` only runs between requests, so a half-sent request line would hold its
  connection for good); past ``--max-connections`` requests are answered 503.

Protocol (JSON over HTTP; ``Authorization: Bearer T`` when ``--token`` is set; every route but
``/health`` names the client's run claim in the ``Opsd-Claim`` header, and ``Opsd-Run`` says
which run it is, for messages; client mistakes are 400 with the reason, a claim held by another
run 409, incomplete weights 503):

- ``GET /health`` -> ``{"ok", "boot_id", "weight_version", "model", "max_model_len",
  "claimed_by", "claim_idle_s", "max_body_bytes"}``, 503 with ``"error"`` while the weights are
  incomplete; ``boot_id`` is new at every start, so a client notices a restart;
- ``POST /claim`` ``{"takeover": bool}`` -> ``{"lease_s", "took"}``: take the server for this
  run (409 while another run's claim is alive; ``takeover`` takes it anyway). Any request
  renews the claim; a client that is alive but quiet renews it here every quarter lease;
- ``POST /release``: the run is over; the next run may claim the server;
- ``POST /generate`` ``{"prompts": [{"input_ids", "key", "images": [base64 PNG]}], "n",
  "sampling": SamplingConfig fields, "eos_token_ids", "suppress_token_ids"}`` ->
  ``{"rollouts": [[{"completion_ids", "finish_reason", "logprobs"}]], "boot_id",
  "weight_version", "weight_claim"}``;
- ``POST /update_weights`` ``{"path": DIR, "version": int}``: check, then reload every weight
  from the safetensors in DIR (written by the trainer), then reset the caches -> ``{"seconds",
  ...}``; with ``{"transport": "group", "version": int}`` instead, receive them over the weight
  group;
- ``POST /init_weight_group`` ``{"host", "port", "backend": "gloo" | "nccl", "timeout_s",
  "secret"}``: join the trainer's two-process group for weight syncs
  (``opsd_mm.rollout.transport``), proving the per-group ``secret`` (hex) the request carries;
- ``POST /reset_cache``;
- ``POST /score`` ``{"rows": [{"input_ids": teacher prompt + completion ids, "start": where the
  completion starts, "images": [base64 PNG]}], "top_k": k}`` -> ``{"scores": [{"logprobs",
  "topk_ids", "topk_logprobs"}], "boot_id", "weight_version", "weight_claim"}``: the teacher's
  log-probs of each completion token, and (k > 0) its top-k, under the weights held
  (``teacher.scoring=server``, ``VLLMEngine.score``; k at most ``--max-logprobs``; a loaded
  adapter is not applied);
- ``POST /update_adapter`` ``{"path": DIR, "version": int}``: generate with the peft LoRA adapter
  in DIR from now on, the weights held staying the base that ``/score`` uses (a fixed LoRA
  teacher served as the base, ``VLLMEngine.load_adapter``; needs ``--max-lora-rank``).

``weight_version`` is the trainer step of the last load and ``weight_claim`` the claim that
loaded it. Engine calls run one at a time (a lock around the engine), in worker threads;
``/health`` answers while a batch is generating.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from opsd_mm.errors import UserError
from opsd_mm.rollout.shared import CLAIM_HEADER, RUN_HEADER, TOKEN_ENV

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server (``opsd-mm serve`` flags).

    ``max_body_bytes``: the largest request body; the default, 256 MiB, holds a ``/generate``
    of a few dozen prompts with a megapixel image each as base64 PNG (a 1280x1280 photo is
    2-5 MB), or thousands of text prompts of thousands of ids. ``idle_timeout_s``: the longest
    wait for a request's head or its next body bytes. ``max_connections``: open connections
    (and requests in flight) before uvicorn answers 503. ``keep_alive_s``: how long an idle
    connection stays open between requests (uvicorn's ``timeout_keep_alive``)."""

    max_body_bytes: int = 256 * _MiB
    idle_timeout_s: float = 30.0
    max_connections: int = 64
    keep_alive_s: float = 5.0


# ----------------------------------------------------------------------------- HTTP


async def _refuse(send: Any, status: int, message: str) -> None:
    """An error reply that closes the connection: whatever the client still sends is never
    read."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Guard:
    """ASGI middleware: the token, then the run claim, then the body, before the app.

    The token (constant-time compare) and the claim (:class:`~opsd_mm.rollout.service.RunClaims`,
    for ``claimed_paths``) come from the headers, so a refused request is answered before its
    body is read. The body is then read whole, counted as it arrives: past ``max_body_bytes``
    (declared or streamed) it is 413, and no byte for ``idle_timeout_s`` is 408. The app gets
    the body replayed."""

    def __init__(
        self,
        app: Any,
        token: str | None,
        limits: Limits,
        check_claim: Any = None,
        claimed_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.expected = None if token is None else f"Bearer {token}".encode()
        self.limits = limits
        self.check_claim = check_claim
        self.claimed_paths = claimed_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(
            headers.get(b"authorization", b""), self.expected
        ):
            await _refuse(send, 401, "missing or wrong bearer token")
            return
        if self.check_claim is not None and scope["path"] in self.claimed_paths:
            refusal = self.check_claim(
                headers.get(CLAIM_HEADER.lower().encode(), b"").decode("latin-1"),
                unquote(headers.get(RUN_HEADER.lower().encode(), b"").decode("latin-1")),
            )
            if refusal is not None:
                await _refuse(send, *refusal)
                return
        cap = self.limits.max_body_bytes
        declared = headers.get(b"content-length")  # digits: h11 refuses anything else
        if declared is not None and int(declared) > cap:
            await _refuse(
                send, 413, f"request body over the server's cap of {cap} bytes (--max-body-mb)"
            )
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.limits.idle_timeout_s)
            except asyncio.TimeoutError:
                await _refuse(
                    send, 408, f"no request body bytes for {self.limits.idle_timeout_s:g} s"
                )
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await _refuse(
                    send, 413, f"request body over the server's cap of {cap} bytes (--max-body-mb)"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def protocol_class(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's head.

    Why: uvicorn arms ``timeout_keep_alive`` only after a response and cancels it as soon as any
    byte arrives, and nothing else bounds the wait for a request line and headers, so a client
    that sends half a request holds a connection (and, with a connection limit, a slot) for
    good. Here a connection waiting for a head (new, or between requests) is closed after
    ``head_timeout_s``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.debug("closing a connection whose request head did not arrive in time")
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's head is complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimeoutProtocol


def build_app(service: Any, token: str | None, limits: Limits = Limits()) -> Any:
    """The ASGI app of ``service`` (a :class:`~opsd_mm.rollout.service.GenerationService`)
    behind a :class:`Guard`."""
    from pydantic import ValidationError
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from opsd_mm.rollout import service as sv

    def _errors(e: ValidationError) -> str:
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err["loc"]) or "body"
            parts.append(f"{where}: {err['msg']}")
        more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
        return "; ".join(parts) + more

    def endpoint(method: Any, model: type) -> Any:
        async def handle(request: Any) -> Any:
            claim = request.headers.get(CLAIM_HEADER, "")
            label = unquote(request.headers.get(RUN_HEADER, ""))
            body = await request.body()

            def run() -> dict[str, Any]:  # parsing a large body belongs off the event loop too
                return method(claim, label, model.model_validate_json(body or b"{}"))

            try:
                return JSONResponse(await run_in_threadpool(run))
            except ValidationError as e:
                return JSONResponse({"error": f"bad request: {_errors(e)}"}, 400)
            except sv.ClientError as e:
                return JSONResponse({"error": str(e)}, 400)
            except sv.ClaimConflict as e:
                holder = {"holder_run": e.holder_run, "idle_s": e.idle_s, "lease_s": e.lease_s}
                return JSONResponse({"error": str(e), **holder}, 409)
            except sv.Unhealthy as e:
                return JSONResponse({"error": f"the server's weights are incomplete: {e}"}, 503)
            except sv.ReloadFailed as e:
                return JSONResponse({"error": str(e)}, 500)
            except ValueError as e:  # the engine's check of a request (a prompt too long)
                return JSONResponse({"error": f"{type(e).__name__}: {e}"}, 400)
            except Exception as e:  # the engine's own failure: report it, keep serving
                log.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse({"error": f"{type(e).__name__}: {e}"}, 500)

        return handle

    async def health(request: Any) -> Any:
        status, body = service.health()
        return JSONResponse({**body, "max_body_bytes": limits.max_body_bytes}, status)

    routes = {
        "/generate": (service.generate, sv.GenerateRequest),
        "/score": (service.score, sv.ScoreRequest),
        "/update_weights": (service.update_weights, sv.UpdateWeightsRequest),
        "/update_adapter": (service.update_adapter, sv.UpdateAdapterRequest),
        "/init_weight_group": (service.init_weight_group, sv.InitGroupRequest),
        "/reset_cache": (service.reset_cache, sv.Empty),
        "/claim": (service.claim, sv.ClaimRequest),
        "/release": (service.release, sv.Empty),
    }
    app = Starlette(
        routes=[Route("/health", health, methods=["GET"])]
        + [Route(p, endpoint(m, model), methods=["POST"]) for p, (m, model) in routes.items()]
    )

    def check_claim(claim: str, label: str) -> tuple[int, str] | None:
        try:
            service.claims.admit(claim, label)
        except sv.ClientError as e:
            return 400, str(e)
        except sv.ClaimConflict as e:
            return 409, str(e)
        return None

    claimed = frozenset(p for p in routes if p not in ("/claim", "/release"))
    return Guard(app, token, limits, check_claim, claimed)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), made before the server runs
    so that its address can be printed first."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address, family=family, backlog=2048)


def uvicorn_server(app: Any, limits: Limits) -> Any:
    """The uvicorn server that runs ``app`` under ``limits``: h11 with a head deadline
    (:func:`protocol_class`), ``limit_concurrency``, ``timeout_keep_alive``; no websockets, no
    lifespan, uvicorn's own logging left to ours. ``.run(sockets=[sock])`` serves until
    SIGINT/SIGTERM (in the main thread) or ``should_exit``."""
    import uvicorn

    config = uvicorn.Config(
        app,
        http=protocol_class(limits.idle_timeout_s),
        ws="none",
        lifespan="off",
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s,
        access_log=False,
        log_config=None,
        log_level="warning",
    )
    return uvicorn.Server(config)


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
    from opsd_mm.rollout.service import GenerationService
    from opsd_mm.rollout.vllm_engine import VLLMEngine

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * _MiB),
        idle_timeout_s=args.idle_timeout_s,
        max_connections=args.max_connections,
    )
    for flag, value in (
        ("--max-body-mb", args.max_body_mb),
        ("--idle-timeout-s", args.idle_timeout_s),
        ("--max-connections", args.max_connections),
        ("--claim-lease-s", args.claim_lease_s),
    ):
        if not value > 0:
            raise UserError(f"serve: {flag} {value}: must be > 0")
    sock = bind(args.host, args.port)  # before the model loads: a taken port fails at once
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
    engine.reference_weights()  # read once now: the first reload is checked without a wait
    service = GenerationService(engine, model, lease_s=args.claim_lease_s)
    app = build_app(service, token, limits)
    host, port = sock.getsockname()[:2]
    # One parseable line: tests and scripts wait for it (and read the port when --port 0).
    print(
        f"serving {model} on http://{host}:{port} boot_id={service.boot_id} "
        f"(ready in {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    try:
        uvicorn_server(app, limits).run(sockets=[sock])
    finally:
        sock.close()
        service.close()
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
        "completion ids and log-probs out; weight reloads from safetensors the trainer writes "
        "or over a weight group. Serves one training run at a time (its claim).",
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
    serve.add_argument(
        "--max-body-mb",
        type=float,
        default=Limits.max_body_bytes / _MiB,
        help="largest request body in MiB (default 256: a /generate of a few dozen prompts "
        "with a megapixel image each); a larger one is refused with 413 as it streams in",
    )
    serve.add_argument(
        "--idle-timeout-s",
        type=float,
        default=Limits.idle_timeout_s,
        help="close a connection whose request head or body stalls this long (default 30)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=Limits.max_connections,
        help="open connections before requests are answered 503 (default 64)",
    )
    serve.add_argument(
        "--claim-lease-s",
        type=float,
        default=60.0,
        help="a run's claim on the server lapses this long after its last request or "
        "heartbeat; another run may then take the server (default 60)",
    )
    serve.add_argument("--llm-kwargs", help="JSON object passed to vllm.LLM last")
    serve.add_argument("--tiny-cache-dir", help="where tiny:* models are built (default cache)")
    serve.set_defaults(func=cmd_serve)
