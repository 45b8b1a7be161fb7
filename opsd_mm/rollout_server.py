"""``rollout.engine=vllm_server``: a RolloutEngine that generates through ``opsd-mm serve``.

Why: the trainer's environment then needs no vLLM (and none of its pins), and generation can
live in another process, on another device or machine (see ``opsd_mm.serve`` for the protocol).

Weight sync goes through files: the trainer writes its current weights (LoRA merged, with the
colocated engine's ``iter_sync_weights``) as checkpoint-format safetensors into
``rollout.server_sync_dir`` and asks the server to reload them. That works without a shared GPU
fabric (CPU, or another machine on a shared filesystem); NCCL between GPUs is not built.

Faults:

- a server that does not answer ``/health`` when the engine is built is a :class:`ServerError`
  before step 1;
- a request that times out or finds the server down is retried ``rollout.server_retries``
  times (backoff 1, 2, 4 ... s). Retrying ``/generate`` is safe: every row is seeded by
  (step seed, prompt key, sample), so the retry returns the same completions, and the trainer's
  step advances once;
- every reply carries the server's ``boot_id``; when it changes, the server restarted with the
  checkpoint's initial weights, so the client asks it to reload the last synced files and
  generates again. Retries exhausted: a ServerError saying what happened.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opsd_mm.errors import UserError
from opsd_mm.rollout_vllm import iter_sync_weights
from opsd_mm.types import Prompt, Rollout, SamplingConfig, TeacherScores

log = logging.getLogger(__name__)

TOKEN_ENV = "OPSD_MM_SERVER_TOKEN"  # as in opsd_mm.serve (which imports vLLM-side code)
SHARD_BYTES = 2 << 30


class ServerError(UserError):
    """The generation server cannot be reached, or failed a request after the retries."""

    kind = "generation server error"


def save_sync_weights(model: torch.nn.Module, directory: str | Path) -> int:
    """Write ``model``'s weights (LoRA merged, checkpoint names) as safetensors shards of at
    most ``SHARD_BYTES`` into ``directory``, replacing the previous ones. Returns bytes written.

    Tensors that share storage (tied embeddings) are written once each under their own name,
    as separate copies: safetensors refuses shared storage."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.safetensors"):
        old.unlink()
    shard: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    size = total = 0
    index = 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            tmp = directory / f".model-{index:05d}.tmp"
            save_file(shard, str(tmp), metadata={"format": "pt"})
            tmp.rename(directory / f"model-{index:05d}.safetensors")
            index += 1
        shard, size = {}, 0

    for name, tensor in iter_sync_weights(model):
        t = tensor.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        t = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    return total


class ServerEngine:
    """Generates through an ``opsd-mm serve`` process at ``url``; see the module docstring."""

    def __init__(
        self,
        url: str,
        sync_dir: str | Path,
        *,
        eos_token_ids: Sequence[int],
        suppress_token_ids: Sequence[int] = (),
        token: str | None = None,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.sync_dir = Path(sync_dir)
        self.eos_token_ids = list(eos_token_ids)
        self.suppress_token_ids = sorted(set(suppress_token_ids))
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.weight_version = 0  # the trainer step last synced; the server echoes what it holds
        self.synced = False  # whether sync_dir holds weights the server should have
        self.last_sync_s = 0.0
        self.last_sync_bytes = 0
        self.restarts = 0
        try:
            health = self._call("GET", "/health", None, retries=0)
        except ServerError as e:
            raise ServerError(
                f"no generation server at {self.url} ({e}); start one from the vLLM environment "
                "(.venv-vllm/bin/opsd-mm serve MODEL --port PORT) and set rollout.server_url"
            ) from None
        self.boot_id = health["boot_id"]
        log.info("generation server %s: %s", self.url, health)

    # ------------------------------------------------------------------ HTTP

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, retries: int | None = None
    ) -> dict[str, Any]:
        """One JSON request, retried on timeouts and connection failures (not on 4xx/5xx
        replies, which a retry would repeat)."""
        retries = self.retries if retries is None else retries
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.url + path, data, headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                raise ServerError(f"{method} {self.url}{path}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if attempt == retries:
                    raise ServerError(
                        f"{method} {self.url}{path} failed {attempt + 1} time(s), last: {reason} "
                        f"(timeout {self.timeout_s:g} s; rollout.server_retries={self.retries})"
                    ) from None
                wait = min(self.backoff_s * 2**attempt, 10.0)
                log.warning(
                    "%s %s: %s; retry %d in %.0f s", method, path, reason, attempt + 1, wait
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _check_boot(self, boot_id: str) -> bool:
        """True when the server restarted since we last saw it (and is now re-synced)."""
        if boot_id == self.boot_id:
            return False
        self.restarts += 1
        log.warning("generation server restarted (boot %s -> %s)", self.boot_id, boot_id)
        self.boot_id = boot_id
        if self.synced:
            self._reload()
        return True

    # ------------------------------------------------------------------ engine interface

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig
    ) -> list[list[Rollout]]:
        if not prompts:
            return []
        body = {
            "prompts": [
                {
                    "input_ids": list(p.input_ids),
                    "key": str(p.meta.get("key", i)),
                    "images": [_encode_image(im) for im in p.images],
                }
                for i, p in enumerate(prompts)
            ],
            "n": n,
            "sampling": vars(sampling),
            "eos_token_ids": self.eos_token_ids,
            "suppress_token_ids": self.suppress_token_ids,
        }
        for _ in range(self.retries + 1):
            reply = self._call("POST", "/generate", body)
            # Completions from a restarted server came from the initial weights: redo them.
            if not self._check_boot(reply["boot_id"]) or not self.synced:
                break
        else:
            raise ServerError(f"generation server {self.url} kept restarting; giving up")
        # The version the server held while it generated (it echoes the last reload's).
        version = reply.get("weight_version")
        return [
            [
                Rollout(r["completion_ids"], r["finish_reason"], r.get("logprobs"), version)
                for r in rollouts
            ]
            for rollouts in reply["rollouts"]
        ]

    def score(
        self, prompts: Sequence[Prompt], starts: Sequence[int], top_k: int
    ) -> list[TeacherScores]:
        """The teacher's log-probs of each prompt's tokens from ``starts[i]`` on, scored by the
        server under the weights it holds (``teacher.scoring=server``; ``VLLMEngine.score``).
        Retried like :meth:`generate` (scoring is deterministic, so a retry is safe); a server
        that restarted meanwhile scored with its initial weights, so it is given the last
        synced ones again and the rows are scored again."""
        if not prompts:
            return []
        body = {
            "rows": [
                {
                    "input_ids": list(p.input_ids),
                    "start": int(start),
                    "images": [_encode_image(im) for im in p.images],
                }
                for p, start in zip(prompts, starts, strict=True)
            ],
            "top_k": int(top_k),
        }
        for _ in range(self.retries + 1):
            reply = self._call("POST", "/score", body)
            if not self._check_boot(reply["boot_id"]) or not self.synced:
                break
        else:
            raise ServerError(f"generation server {self.url} kept restarting; giving up")
        held = reply.get("weight_version")
        if self.synced and held != self.weight_version:
            raise ServerError(
                f"generation server {self.url} scored with weight version {held}, but this "
                f"trainer last synced version {self.weight_version}: is another client "
                "updating its weights? A live teacher must be the weights being trained"
            )
        return [
            TeacherScores(s["logprobs"], s.get("topk_ids"), s.get("topk_logprobs"))
            for s in reply["scores"]
        ]

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """Write the merged weights into ``sync_dir`` and have the server reload them, as
        ``version`` (the trainer step; None: one more than the last). Under several processes
        only the main one writes and calls; the others wait at a barrier. Never call it while a
        ``generate`` of this engine is in flight (``opsd_mm.rollout_async`` waits first)."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not dist or torch.distributed.get_rank() == 0:
            start = time.perf_counter()
            self.last_sync_bytes = save_sync_weights(model, self.sync_dir)
            self.weight_version = self.weight_version + 1 if version is None else version
            self.synced = True
            self._reload()
            self.last_sync_s = time.perf_counter() - start
        if dist:
            torch.distributed.barrier()

    def _reload(self) -> None:
        body = {"path": str(self.sync_dir.resolve()), "version": self.weight_version}
        reply = self._call("POST", "/update_weights", body)
        if reply["boot_id"] != self.boot_id:  # restarted between two calls: it has them now
            log.warning(
                "generation server restarted (boot %s -> %s); weights reloaded",
                self.boot_id,
                reply["boot_id"],
            )
            self.boot_id = reply["boot_id"]
            self.restarts += 1

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", None)


def _encode_image(image: Any) -> str:
    from opsd_mm.serve import encode_image

    return encode_image(image)


def build_server_engine(
    cfg: Any, model: torch.nn.Module, processor: Any, cls: type[ServerEngine] = ServerEngine
) -> ServerEngine:
    """The ``vllm_server`` engine for a run config: checks the server is up and loads the
    trainer's weights into it, before step 1 (a long-lived server may hold another run's).
    ``cls``: ``ServerEngine`` or a subclass (``opsd_mm.rollout_server_adapter``)."""
    r = cfg.rollout
    engine = cls(
        r.server_url,
        r.server_sync_dir or Path(cfg.run_dir) / "engine_weights",
        eos_token_ids=processor.eos_token_ids,
        suppress_token_ids=processor.suppress_token_ids,
        token=r.server_token,
        timeout_s=r.server_timeout_s,
        retries=r.server_retries,
    )
    engine.sync_weights(model, version=0)
    return engine
