"""What the generation server does with a request, apart from HTTP: the engine behind a lock,
the run that claims it, the weights it holds and whether they are whole.

``opsd_mm.rollout.server`` puts this behind an ASGI app; the requests arrive here validated by
the pydantic models below (a client mistake is a ``pydantic.ValidationError`` or a
:class:`ClientError`: HTTP 400 with the reason) and every field is parsed before the engine is
touched. Imported by the server (and its tests) only: ``import opsd_mm`` needs no pydantic.

The engine is duck-typed (:class:`~opsd_mm.rollout.vllm_engine.VLLMEngine`, or a fake in the
protocol tests): ``generate``, ``score``, ``load_weights(named_tensors)``, ``check_weights
(manifest)``, ``load_adapter``, ``reset_caches``, and ``max_model_len``, ``vocab_size``,
``max_logprobs``, ``accepts_images``, ``eos_token_ids``, ``suppress_token_ids``.

Weight updates are transactions. The whole set is checked against the engine's own weights
(names under vLLM's mapping, shapes, kinds of dtype; complete, nothing extra) before the first
tensor loads: from the files' headers, or from the manifest the weight group sends first. A
refused set leaves the engine as it was (400). A reload that fails part-way (a file that cannot
be read, a trainer that dies mid-send) leaves a mix of old and new weights that cannot be
undone without a second copy of the model, so the server says so instead: ``/health`` answers
503 with the reason, ``/generate`` and ``/score`` refuse with it (503), until a complete reload
succeeds; never a hang, never completions from half-loaded weights.

A run claims the server (:class:`RunClaims`). Every request that uses or changes the weights
names its client's claim (``Opsd-Claim``); another client's is refused (409) for as long as the
holder is alive, so two trainers never train on each other's weights. Every weight version the
server reports is the claim that loaded it plus the trainer step, so a reply from weights
another client loaded never passes for this client's.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from opsd_mm.rollout.shared import (
    WeightSetError,
    decode_image,
    file_manifest,
    iter_safetensors,
    safetensors_files,
)
from opsd_mm.types import Prompt, SamplingConfig

log = logging.getLogger(__name__)

# The most rows (prompts x n) one /generate may ask for, and the longest join of a weight group.
MAX_ROWS = 65536
MAX_GROUP_TIMEOUT_S = 3600.0


class ClientError(ValueError):
    """The request is wrong (HTTP 400); the message says how."""


class ClaimConflict(RuntimeError):
    """Another run holds the server (HTTP 409). ``holder_run``: the holder's run directory as
    its client declared it ("" when unknown), with ``idle_s`` since its last request and the
    ``lease_s`` after which it lapses, so a restarted process of the same run can wait for its
    predecessor's claim to lapse instead of failing."""

    def __init__(
        self, message: str, holder_run: str = "", idle_s: float = 0.0, lease_s: float = 0.0
    ) -> None:
        super().__init__(message)
        self.holder_run, self.idle_s, self.lease_s = holder_run, idle_s, lease_s


class Unhealthy(RuntimeError):
    """The server's weights are incomplete after a failed reload (HTTP 503)."""


class ReloadFailed(RuntimeError):
    """A reload failed part-way; the server is now unhealthy (HTTP 500, the reason)."""


# ----------------------------------------------------------------------------- requests


class _Request(BaseModel):
    # strict: no "3" for 3, no 1.5 for an id; finite floats only (a NaN temperature is refused
    # here instead of reaching the sampler).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SamplingIn(_Request):
    """:class:`~opsd_mm.types.SamplingConfig`'s fields, in their valid ranges."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int | None = None


class PromptIn(_Request):
    input_ids: list[int] = Field(min_length=1)
    key: str | int | None = None
    images: list[str] = []


class GenerateRequest(_Request):
    prompts: list[PromptIn]
    n: int = Field(ge=1)
    sampling: SamplingIn
    eos_token_ids: list[int] = Field(min_length=1)
    suppress_token_ids: list[int] = []


class ScoreRow(_Request):
    input_ids: list[int] = Field(min_length=2)
    start: int = Field(ge=1)
    images: list[str] = []


class ScoreRequest(_Request):
    rows: list[ScoreRow]
    top_k: int = Field(0, ge=0)


class UpdateWeightsRequest(_Request):
    version: int = Field(ge=0)
    transport: Literal["file", "group"] = "file"
    path: str | None = None

    @model_validator(mode="after")
    def _path_iff_file(self) -> UpdateWeightsRequest:
        if (self.transport == "file") != (self.path is not None):
            raise ValueError("path is required with transport file, and only then")
        return self


class UpdateAdapterRequest(_Request):
    path: str = Field(min_length=1)
    version: int = Field(ge=0)


class InitGroupRequest(_Request):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    backend: Literal["gloo", "nccl"]
    timeout_s: float = Field(gt=0, le=MAX_GROUP_TIMEOUT_S)
    secret: str = Field(pattern=r"^[0-9a-f]{64}$")


class ClaimRequest(_Request):
    takeover: bool = False
    run: str = Field("", max_length=4096)  # the run directory, so its restart is recognised


class Empty(_Request):
    pass


# ----------------------------------------------------------------------------- the run claim


@dataclass
class _Holder:
    claim: str
    label: str
    since: float
    seen: float
    run: str = ""


class RunClaims:
    """Which client (one trainer run, all its processes) may use the server's weights.

    A request naming a claim is admitted when that claim holds the server, or when nobody
    does (it then takes it: the first request of a run, or the first after a release or a
    restart). Another claim is refused (:class:`ClaimConflict`, naming the holder's run) while
    the holder is alive: its requests, or the client's heartbeat (``POST /claim`` every quarter
    lease), keep it within ``lease_s`` seconds. A claim unused for ``lease_s`` (a killed trainer)
    may be taken by the next run, and ``takeover`` takes a live one. A claim that was taken
    over is refused for good: its run stops with a message instead of sampling from another
    run's weights."""

    def __init__(self, lease_s: float, clock: Any = time.monotonic) -> None:
        self.lease_s = lease_s
        self.clock = clock
        self.holder: _Holder | None = None
        self.taken: dict[str, str] = {}  # claim taken over -> the run that took it
        self._lock = threading.Lock()

    def admit(
        self, claim: str | None, label: str, *, takeover: bool = False, run: str = ""
    ) -> str | None:
        """Admit ``claim`` (see the class docstring); returns the run it took the server from
        (None: it held it, or nobody did)."""
        if not claim:
            raise ClientError(
                "this request needs an Opsd-Claim header naming the client (any id, the same on "
                "every request of a run): the server serves one run at a time"
            )
        with self._lock:
            now = self.clock()
            if claim in self.taken:
                raise ClaimConflict(
                    f"this run's claim on the generation server was taken over by "
                    f"{self.taken[claim]}; the server's weights are no longer this run's. Resume "
                    "the run when that one has finished, or use another server"
                )
            held = self.holder
            if held is not None and held.claim == claim:
                held.seen = now
                held.label = label or held.label
                held.run = run or held.run
                return None
            if held is not None and not takeover and now - held.seen < self.lease_s:
                raise ClaimConflict(
                    f"the generation server is in use by {held.label or 'another client'} "
                    f"(last request {now - held.seen:.0f} s ago; a claim lapses {self.lease_s:g} "
                    "s after its run's last request). Wait for that run to finish, point "
                    "rollout.server_url at another server, or, if that run has stopped, take "
                    "the server over with rollout.server_takeover=true",
                    holder_run=held.run,
                    idle_s=now - held.seen,
                    lease_s=self.lease_s,
                )
            if held is not None:
                self.taken[held.claim] = label or "another client"
                log.warning(
                    "run claim: %s takes the server from %s (%s)",
                    label or claim,
                    held.label or held.claim,
                    "takeover" if takeover else f"idle {now - held.seen:.0f} s",
                )
            self.holder = _Holder(claim, label, now, now, run)
            return held.label if held is not None else None

    def release(self, claim: str | None) -> bool:
        with self._lock:
            if claim and self.holder is not None and self.holder.claim == claim:
                self.holder = None
                return True
            return False

    def holds(self, claim: str) -> bool:
        with self._lock:
            return self.holder is not None and self.holder.claim == claim

    def describe(self) -> dict[str, Any]:
        with self._lock:
            held = self.holder
            if held is None:
                return {"claimed_by": None, "claim_idle_s": None}
            return {"claimed_by": held.label, "claim_idle_s": round(self.clock() - held.seen, 1)}


# ----------------------------------------------------------------------------- the service


@dataclass
class _Group:
    claim: str
    group: Any
    device: Any


class GenerationService:
    """The server's state: one engine behind a lock, its boot id, the run claim, the weight
    version it holds (the claim that loaded it, the trainer's step) and whether it is whole."""

    def __init__(self, engine: Any, model: str, *, lease_s: float = 60.0) -> None:
        self.engine = engine
        self.model = model
        self.boot_id = uuid.uuid4().hex
        self.claims = RunClaims(lease_s)
        self.lock = threading.Lock()  # around every engine call; never held across a join
        self.group_lock = threading.Lock()  # around ``self.group`` only
        self.group: _Group | None = None  # the claimant's weight group (init_weight_group)
        self.version_step = 0
        self.version_claim: str | None = None  # None: the checkpoint's own weights
        self.unhealthy: str | None = None  # why the weights are incomplete (None: whole)

    # ------------------------------------------------------------------ reading

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body): 503 while the weights are incomplete."""
        body = {
            "ok": self.unhealthy is None,
            "boot_id": self.boot_id,
            "weight_version": self.version_step,
            "model": self.model,
            "max_model_len": self.engine.max_model_len,
            **self.claims.describe(),
        }
        if self.unhealthy is not None:
            body["error"] = self.unhealthy
        return (200 if self.unhealthy is None else 503), body

    def _stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            **body,
            "boot_id": self.boot_id,
            "weight_version": self.version_step,
            "weight_claim": self.version_claim,
        }

    def _check_usable(self, claim: str, label: str) -> None:
        """Under the engine lock, right before the engine is used: the claim still holds and
        the weights are whole."""
        self.claims.admit(claim, label)
        if self.unhealthy is not None:
            raise Unhealthy(self.unhealthy)

    def _ids(self, ids: list[int], where: str) -> None:
        vocab = self.engine.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            bad = next(i for i in ids if not 0 <= i < vocab)
            raise ClientError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab})")

    def _images(self, images: list[str], where: str) -> list[Any]:
        if images and not self.engine.accepts_images:
            raise ClientError(f"{where}: images sent to {self.model}, which takes no images")
        out = []
        for j, data in enumerate(images):
            try:
                out.append(decode_image(data))
            except ValueError as e:
                raise ClientError(f"{where}.images[{j}]: {e}") from None
        return out

    def generate(self, claim: str, label: str, req: GenerateRequest) -> dict[str, Any]:
        s = req.sampling
        if s.top_k > self.engine.vocab_size:
            raise ClientError(
                f"sampling.top_k={s.top_k} is over the vocabulary ({self.engine.vocab_size})"
            )
        if s.max_new_tokens >= self.engine.max_model_len:
            raise ClientError(
                f"sampling.max_new_tokens={s.max_new_tokens} leaves no room for a prompt within "
                f"the server's max_model_len={self.engine.max_model_len}"
            )
        if len(req.prompts) * req.n > MAX_ROWS:
            raise ClientError(f"{len(req.prompts)} prompts x n={req.n} is over {MAX_ROWS} rows")
        self._ids(req.eos_token_ids, "eos_token_ids")
        self._ids(req.suppress_token_ids, "suppress_token_ids")
        prompts = []
        for i, p in enumerate(req.prompts):
            self._ids(p.input_ids, f"prompts[{i}].input_ids")
            images = self._images(p.images, f"prompts[{i}]")
            key = p.key if p.key is not None else i
            prompts.append(Prompt(input_ids=list(p.input_ids), images=images, meta={"key": key}))
        sampling = SamplingConfig(**s.model_dump())
        with self.lock:
            self._check_usable(claim, label)
            # Per request, as the colocated engine takes them from the processor.
            self.engine.eos_token_ids = list(req.eos_token_ids)
            self.engine.suppress_token_ids = sorted(set(req.suppress_token_ids))
            rollouts_P_G = self.engine.generate(prompts, req.n, sampling)
            reply = self._stamp({})
        reply["rollouts"] = [
            [
                {
                    "completion_ids": r.completion_ids,
                    "finish_reason": r.finish_reason,
                    "logprobs": r.logprobs,
                }
                for r in rollouts
            ]
            for rollouts in rollouts_P_G
        ]
        return reply

    def score(self, claim: str, label: str, req: ScoreRequest) -> dict[str, Any]:
        if req.top_k > self.engine.max_logprobs:
            raise ClientError(
                f"top_k={req.top_k} is over the server's --max-logprobs={self.engine.max_logprobs}"
            )
        prompts, starts = [], []
        for i, row in enumerate(req.rows):
            where = f"rows[{i}]"
            self._ids(row.input_ids, f"{where}.input_ids")
            if row.start >= len(row.input_ids):
                raise ClientError(f"{where}.start={row.start} is past its {len(row.input_ids)} ids")
            images = self._images(row.images, where)
            prompts.append(Prompt(input_ids=list(row.input_ids), images=images, meta={"key": i}))
            starts.append(row.start)
        with self.lock:
            self._check_usable(claim, label)
            scores = self.engine.score(prompts, starts, req.top_k)
            reply = self._stamp({})
        reply["scores"] = [vars(s) for s in scores]
        return reply

    # ------------------------------------------------------------------ weights

    def _loaded(self, claim: str, version: int) -> None:
        self.version_step, self.version_claim = version, claim
        self.unhealthy = None

    def _reload(self, stream: Any, what: str) -> float:
        """``engine.load_weights(stream)`` under the lock the caller holds; a failure marks the
        server unhealthy (the engine was touched) and is a :class:`ReloadFailed`."""
        try:
            return self.engine.load_weights(stream)
        except Exception as e:
            self.unhealthy = (
                f"the reload of {what} failed part-way ({type(e).__name__}: {e}); the weights "
                "are incomplete, so /generate and /score refuse until a complete "
                "/update_weights succeeds (the trainer's next sync, or its --resume)"
            )
            log.exception("weight reload failed; the server is unhealthy until the next one")
            raise ReloadFailed(self.unhealthy) from None

    def update_weights(self, claim: str, label: str, req: UpdateWeightsRequest) -> dict[str, Any]:
        start = time.perf_counter()
        if req.transport == "group":
            seconds = self._receive_weights(claim, label, req.version)
        else:
            try:
                files = safetensors_files(req.path)
                problems = self.engine.check_weights(file_manifest(files))
            except WeightSetError as e:
                raise ClientError(f"weights refused, nothing loaded: {e}") from None
            if problems:
                raise ClientError(
                    f"weights in {req.path} refused, nothing loaded: {'; '.join(problems)}"
                )
            with self.lock:
                self.claims.admit(claim, label)
                seconds = self._reload(iter_safetensors(files), f"{req.path}")
                self._loaded(claim, req.version)
        log.info("weights version %d loaded in %.2f s", req.version, time.perf_counter() - start)
        return self._stamp({"seconds": seconds})

    def _receive_weights(self, claim: str, label: str, version: int) -> float:
        """Load what the trainer broadcasts over the weight group. The manifest arrives and is
        checked outside the engine lock (the wait for it is the group's timeout at most); a
        refused set is drained (received and dropped) so the group stays aligned with the
        trainer's sends. Once loading began, the stream is drained to its end marker even when
        the load fails."""
        from opsd_mm.rollout.transport import receive_manifest, receive_weights

        with self.group_lock:
            handle = self.group
        if handle is None or handle.claim != claim:
            raise ClientError("no weight group: POST /init_weight_group first")
        manifest = receive_manifest(handle.group, handle.device)
        problems = self.engine.check_weights(manifest)
        if problems:
            for _ in receive_weights(handle.group, handle.device, manifest):
                pass
            raise ClientError(f"weights refused, nothing loaded: {'; '.join(problems)}")
        stream = receive_weights(handle.group, handle.device, manifest)
        try:
            with self.lock:
                self.claims.admit(claim, label)
                seconds = self._reload(stream, "the weights sent over the group")
                self._loaded(claim, version)
        finally:
            try:
                for _ in stream:
                    pass
            except Exception:  # noqa: BLE001 (the load's own error, or this one, is reported)
                log.debug("weight stream ended with an error while draining", exc_info=True)
        return seconds

    def init_weight_group(self, claim: str, label: str, req: InitGroupRequest) -> dict[str, Any]:
        """Join the trainer's two-process weight group (``opsd_mm.rollout.transport``) as rank
        1, replacing any earlier one. The join (a network wait of up to ``timeout_s``) holds no
        lock: generation goes on meanwhile."""
        from opsd_mm.rollout.transport import GroupAuthError, close_group, open_group

        self.claims.admit(claim, label)
        if req.backend == "nccl" and not torch.cuda.is_available():
            raise ClientError("backend nccl: this server has no CUDA device")
        try:
            group = open_group(req.host, req.port, 1, req.backend, req.timeout_s, secret=req.secret)
        except GroupAuthError as e:
            raise ClientError(f"weight group at {req.host}:{req.port} refused: {e}") from None
        except (RuntimeError, OSError, ValueError) as e:  # unreachable, timed out
            raise ClientError(
                f"weight group at {req.host}:{req.port} not joined within {req.timeout_s:g} s: "
                f"{type(e).__name__}: {str(e)[:300]}"
            ) from None
        device = torch.device("cuda" if req.backend == "nccl" else "cpu")
        with self.group_lock:
            old, self.group = self.group, _Group(claim, group, device)
        if old is not None:
            close_group(old.group)
        return {"ok": True, "boot_id": self.boot_id}

    def update_adapter(self, claim: str, label: str, req: UpdateAdapterRequest) -> dict[str, Any]:
        if not (Path(req.path) / "adapter_config.json").is_file():
            raise ClientError(f"{req.path}: no peft adapter there (no adapter_config.json)")
        with self.lock:
            self._check_usable(claim, label)
            seconds = self.engine.load_adapter(req.path)
            self.version_step, self.version_claim = req.version, claim
        return self._stamp({"seconds": seconds})

    def reset_cache(self, claim: str, label: str, req: Empty) -> dict[str, Any]:
        with self.lock:
            self.claims.admit(claim, label)
            self.engine.reset_caches()
        return {"ok": True, "boot_id": self.boot_id}

    # ------------------------------------------------------------------ the claim

    def claim(self, claim: str, label: str, req: ClaimRequest) -> dict[str, Any]:
        took = self.claims.admit(claim, label, takeover=req.takeover, run=req.run)
        if took is not None:
            self._drop_group_of_others(claim)
        return {"ok": True, "boot_id": self.boot_id, "lease_s": self.claims.lease_s, "took": took}

    def release(self, claim: str, label: str, req: Empty) -> dict[str, Any]:
        released = self.claims.release(claim)
        if released:
            self._drop_group_of_others(None)
        return {"ok": True, "boot_id": self.boot_id, "released": released}

    def close(self) -> None:
        """The server is stopping: close the weight group while the interpreter still runs."""
        self._drop_group_of_others(None)

    def _drop_group_of_others(self, claim: str | None) -> None:
        """A weight group belongs to the claim that opened it: close it when that claim ends."""
        from opsd_mm.rollout.transport import close_group

        with self.group_lock:
            old = self.group
            if old is None or old.claim == claim:
                return
            self.group = None
        close_group(old.group)
