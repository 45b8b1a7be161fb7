"""``rollout.engine=vllm_server``: a RolloutEngine that generates through ``opsd-mm serve``.

Why: the trainer's environment then needs no vLLM (and none of its pins), and generation can
live in another process, on another device or machine (see ``opsd_mm.rollout.server`` for the protocol).

Weight sync (``rollout.server_transport``) sends the trainer's current weights (LoRA merged,
with the colocated engine's ``iter_sync_weights``) in one of two ways:

- ``file``: as checkpoint-format safetensors written into ``rollout.server_sync_dir``, which the
  server reloads. Needs only a path both can read (the same machine, or a shared filesystem).
- ``gloo`` / ``nccl``: broadcast over a two-process group the trainer hosts and the server joins
  (``opsd_mm.rollout.transport``): tensor by tensor from the trainer's memory into vLLM's reload,
  nothing on disk. ``nccl`` moves them GPU to GPU (trainer and server on different GPUs);
  ``gloo`` over TCP works anywhere, the server reaching the trainer at
  ``rollout.server_group_host``.

Under several trainer processes each generates its own prompts, and only the main one syncs
the weights; a sharded (FSDP2) model's weights are gathered by all of them together, the others
discarding theirs.

One run at a time: the main process claims the server when the engine is built (``POST
/claim``; a random claim id that all of the run's processes share and send with every request
in ``Opsd-Claim``; a refusal stops every process), keeps the
claim alive with a heartbeat while it is quiet, and releases it when training ends
(:meth:`ServerEngine.release`, called by the trainer). A server claimed by another live run is a
:class:`ServerError` before step 1 naming that run; ``rollout.server_takeover=true`` takes it
(that run then stops with a message). Replies carry the weight version the server held, which
names the claim that loaded it: a reply from weights this client did not sync is refused.

Faults:

- a server that does not answer ``/health`` when the engine is built is a :class:`ServerError`
  before step 1; one that answers 401 is "the server refused the token", naming
  ``rollout.server_token`` and ``OPSD_MM_SERVER_TOKEN``;
- a request that times out or finds the server down is retried ``rollout.server_retries``
  times (backoff 1, 2, 4 ... s). Retrying ``/generate`` is safe: every row is seeded by
  (step seed, prompt key, sample), so the retry returns the same completions, and the trainer's
  step advances once;
- every reply carries the server's ``boot_id``; when it changes, the server restarted with the
  checkpoint's initial weights, so the client makes it hold the last synced weights again (the
  files reloaded; over a group: the group re-opened and the model, unchanged since that sync,
  sent again) and generates again. Retries exhausted: a ServerError saying what happened. With
  a group transport and ``rollout.async`` the model is being trained while the next batch
  generates, so the synced weights no longer exist to be sent: the run stops with a ServerError
  (resume it with ``--resume``, which is exact).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import torch

from opsd_mm.errors import UserError
from opsd_mm.rollout.shared import (
    CLAIM_HEADER,
    RUN_HEADER,
    TOKEN_ENV,
    encode_image,
    iter_sync_weights,
    save_sync_weights,
    sync_manifest,
)
from opsd_mm.types import Prompt, Rollout, SamplingConfig, TeacherScores

log = logging.getLogger(__name__)


class ServerError(UserError):
    """The generation server cannot be reached, refused a request, or failed it after the
    retries. ``status``: the HTTP status of a reply (None: no reply); ``reply``: its JSON."""

    kind = "generation server error"

    def __init__(self, message: str, status: int | None = None, reply: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.reply = reply if isinstance(reply, dict) else {}


def _http_error(method: str, url: str, e: urllib.error.HTTPError) -> ServerError:
    """A :class:`ServerError` saying what the server's error reply means."""
    raw = e.read().decode(errors="replace")
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = {}
    detail = reply.get("error", raw[:500]) if isinstance(reply, dict) else raw[:500]
    if e.code == 401:
        return ServerError(
            f"the generation server at {url.rsplit('/', 1)[0]} refused the token (HTTP 401): "
            f"set rollout.server_token, or the {TOKEN_ENV} environment variable, to the --token "
            "the server was started with",
            401,
            reply,
        )
    if e.code == 409:
        return ServerError(f"{method} {url}: {detail}", 409, reply)
    return ServerError(f"{method} {url}: HTTP {e.code}: {detail}", e.code, reply)


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _from_main(value: Any) -> Any:
    """``value`` as the main process has it, on every process of the run (a no-op alone)."""
    box = [value]
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


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
        transport: str = "file",
        group_host: str = "127.0.0.1",
        group_port: int = 0,
        trains_while_generating: bool = False,
        takeover: bool = False,
        label: str | None = None,
        run: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.sync_dir = Path(sync_dir)
        self.transport = transport
        self.group_host, self.group_port = group_host, group_port
        self.group: Any = None  # the weight group (gloo/nccl transports), opened at first sync
        self._synced_model: torch.nn.Module | None = None  # what a restarted server needs again
        self.trains_while_generating = trains_while_generating
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
        self.last_server_load_s = 0.0  # of that, the server's own reload (vLLM's in-place load)
        self.restarts = 0
        # The run claim: one id for all of the run's processes (rank 0's), and what the server
        # tells others about this run.
        self.claim_id = _from_main(uuid.uuid4().hex)  # all of a run's processes share one
        self.label = label or f"pid {os.getpid()} on {socket.gethostname()}"
        self.run = run or ""  # the run directory: a restart of this run waits for its old claim
        self.claimed = False  # whether this process holds the claim (the main one)
        self.lease_s = 0.0
        self._heartbeat: threading.Event | None = None
        self.max_body_bytes: int | None = None
        if transport == "nccl" and not torch.cuda.is_available():
            raise ServerError(
                "rollout.server_transport=nccl needs a CUDA device in the trainer; use gloo or file"
            )
        try:
            health = self.health(retries=0)  # incomplete weights are fine: the first sync fixes
        except ServerError as e:
            if e.status is not None:
                raise
            raise ServerError(
                f"no generation server at {self.url} ({e}); start one from the vLLM "
                "environment (.venv-vllm/bin/opsd-mm serve MODEL --port PORT) and set "
                "rollout.server_url"
            ) from None
        self.boot_id = health["boot_id"]
        self.max_body_bytes = health.get("max_body_bytes")
        log.info("generation server %s: %s", self.url, health)
        refused = None
        if _is_main_process():
            try:
                self._claim(takeover)
            except ServerError as e:
                refused = e
        # Every process stops with the main one's refusal (none waits for it at a barrier).
        refusal = _from_main(None if refused is None else (str(refused), refused.status))
        if refusal is not None:
            raise refused or ServerError(*refusal)

    # ------------------------------------------------------------------ the run claim

    def _claim(self, takeover: bool) -> None:
        """Claim the server for this run (a :class:`ServerError` naming the run that holds
        it), then keep the claim alive from a heartbeat thread.

        A claim held under this run's own directory is an earlier process of this run that
        stopped without releasing it (killed, preempted, crashed) and is now resumed: wait for
        that claim to lapse (at most the server's lease) rather than fail - a requeued job
        would otherwise die at once. A holder that stays alive through its lease is another
        live process on the same run directory, and is refused."""
        body = {"takeover": takeover, "run": self.run}
        waited = False
        deadline = None
        while True:
            try:
                reply = self._call("POST", "/claim", body, retries=0)
                break
            except ServerError as e:
                if e.status != 409:
                    raise
                same_run = bool(self.run) and e.reply.get("holder_run") == self.run
                now = time.monotonic()
                if same_run and deadline is None:
                    lease, idle = float(e.reply.get("lease_s", 0)), float(e.reply.get("idle_s", 0))
                    deadline = now + max(0.0, lease - idle) + 2.0
                    log.warning(
                        "generation server %s is still claimed by an earlier process of this "
                        "run (%s); waiting up to %.0f s for that claim to lapse",
                        self.url,
                        self.run,
                        deadline - now,
                    )
                if same_run and now < deadline:
                    waited = True
                    time.sleep(min(2.0, max(0.05, deadline - now)))
                    continue
                extra = (
                    "; it stayed alive through its lease: another trainer is running on this run "
                    "directory"
                    if same_run and waited
                    else ""
                )
                raise ServerError(
                    f"{e.reply.get('error', e)}{extra} (server {self.url})", 409, e.reply
                ) from None
        if reply.get("took"):
            log.warning(
                "rollout.server_takeover: took the generation server from %s", reply["took"]
            )
        self.claimed = True
        self.lease_s = float(reply.get("lease_s", 60.0))
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        """Renew the claim every quarter lease while nothing else does. The thread holds the
        engine weakly: it stops at :meth:`release`, when the engine is collected, or when the
        server refuses (taken over: the next request says so)."""
        if self._heartbeat is not None or not self.lease_s:
            return
        stop = self._heartbeat = threading.Event()
        ref, every = weakref.ref(self), self.lease_s / 4

        def beat() -> None:
            while not stop.wait(every):
                engine = ref()
                if engine is None:
                    return
                try:
                    engine._call("POST", "/claim", {}, retries=0, timeout_s=every)
                except ServerError as e:
                    if e.status == 409:
                        log.warning("generation server claim lost: %s", e)
                        return
                    log.debug("claim heartbeat: %s", e)
                del engine

        threading.Thread(target=beat, daemon=True, name="opsd-server-claim").start()

    def _drop_group(self) -> None:
        """Close the weight group (its peer may be gone already)."""
        group, self.group = self.group, None
        if group is not None:
            from opsd_mm.rollout.transport import close_group

            try:
                close_group(group)
            except Exception as e:  # noqa: BLE001 (a dead peer's group may not shut down cleanly)
                log.debug("closing the weight group: %s", e)

    def release(self) -> None:
        """The run is over (the trainer calls this when training ends, cleanly or not): release
        the server for the next run and close the weight group. Best effort: a server that does
        not answer lets the claim lapse by itself. Idempotent; a later request claims again."""
        if self._heartbeat is not None:
            self._heartbeat.set()
            self._heartbeat = None
        self._drop_group()
        if not self.claimed:
            return
        self.claimed = False
        try:
            self._call("POST", "/release", {}, retries=0, timeout_s=min(self.timeout_s, 30.0))
        except ServerError as e:
            log.warning("generation server %s: release failed (%s); the claim lapses", self.url, e)

    def __enter__(self) -> ServerEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ HTTP

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        retries: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One JSON request, retried on timeouts and connection failures (not on 4xx/5xx
        replies, which a retry would repeat; those are a :class:`ServerError` with the
        server's reason and ``status``)."""
        retries = self.retries if retries is None else retries
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        data = None if body is None else json.dumps(body).encode()
        if data is not None and self.max_body_bytes and len(data) > self.max_body_bytes:
            raise ServerError(
                f"POST {self.url}{path}: a request of {len(data) / 2**20:.1f} MiB is over the "
                f"server's cap of {self.max_body_bytes / 2**20:.1f} MiB; start it with a larger "
                "--max-body-mb, or send fewer prompts per step (trainer.batch_size)"
            )
        headers = {
            "Content-Type": "application/json",
            CLAIM_HEADER: self.claim_id,
            RUN_HEADER: quote(self.label),
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.url + path, data, headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as e:
                raise _http_error(method, self.url + path, e) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if attempt == retries:
                    raise ServerError(
                        f"{method} {self.url}{path} failed {attempt + 1} time(s), last: {reason} "
                        f"(timeout {timeout_s:g} s; rollout.server_retries={self.retries})"
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
            if self.transport != "file" and self.trains_while_generating:
                raise ServerError(
                    f"generation server {self.url} restarted while generating ahead "
                    f"(rollout.async) with rollout.server_transport={self.transport}: the weights "
                    "it must reload are being trained and were not written anywhere. Resume the "
                    "run with --resume (exact), or use rollout.server_transport=file"
                )
            self._drop_group()  # its server end went with the old process
            self._reload()
        return True

    def _weights_call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a request whose answer depends on the weights the server holds (generation,
        teacher scores). A reply from a restarted server came from its initial weights: it is
        given the last synced ones again (``_check_boot``) and the request is redone."""
        for _ in range(self.retries + 1):
            reply = self._call("POST", path, body)
            if not self._check_boot(reply["boot_id"]) or not self.synced:
                return reply
        raise ServerError(f"generation server {self.url} kept restarting; giving up")

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
                    "images": [encode_image(im) for im in p.images],
                }
                for i, p in enumerate(prompts)
            ],
            "n": n,
            "sampling": vars(sampling),
            "eos_token_ids": self.eos_token_ids,
            "suppress_token_ids": self.suppress_token_ids,
        }
        reply = self._weights_call("/generate", body)
        # The version the server held while it generated (it echoes the last reload's).
        version = self._check_version(reply, "generated")
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
                    "images": [encode_image(im) for im in p.images],
                }
                for p, start in zip(prompts, starts, strict=True)
            ],
            "top_k": int(top_k),
        }
        reply = self._weights_call("/score", body)
        self._check_version(reply, "scored")
        return [
            TeacherScores(s["logprobs"], s.get("topk_ids"), s.get("topk_logprobs"))
            for s in reply["scores"]
        ]

    def _check_version(self, reply: dict[str, Any], did: str) -> int | None:
        """The reply's weight version, once this client has synced weights: refused unless it
        is the version this client synced last, loaded under this client's claim."""
        held, by = reply.get("weight_version"), reply.get("weight_claim")
        if self.synced and (held != self.weight_version or by != self.claim_id):
            whose = "this trainer's" if by == self.claim_id else "another client's"
            raise ServerError(
                f"generation server {self.url} {did} with weight version {held} ({whose}), but "
                f"this trainer last synced version {self.weight_version}: is another client "
                "updating its weights? Rollouts and a live teacher must come from the weights "
                "being trained"
            )
        return held

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """Write the merged weights into ``sync_dir`` and have the server reload them, as
        ``version`` (the trainer step; None: one more than the last). Under several processes
        only the main one writes and calls; the others wait at a barrier. Never call it while a
        ``generate`` of this engine is in flight (``opsd_mm.rollout.prefetch`` waits first)."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not dist or torch.distributed.get_rank() == 0:
            start = time.perf_counter()
            self.weight_version = self.weight_version + 1 if version is None else version
            self._synced_model = model
            if self.transport == "file":
                self.last_sync_bytes = save_sync_weights(model, self.sync_dir)
                self.synced = True
                self._reload()
            else:
                self.synced = True
                self._send_over_group(model)
            self.last_sync_s = time.perf_counter() - start
        elif any(hasattr(p, "full_tensor") for p in model.parameters()):
            for _ in iter_sync_weights(model):  # the gathers need every process
                pass
        if dist:
            torch.distributed.barrier()

    def _reload(self) -> None:
        """Make the server hold the last synced weights again (after a restart)."""
        if self.transport != "file":
            self._send_over_group(self._synced_model)
            return
        body = {"path": str(self.sync_dir.resolve()), "version": self.weight_version}
        reply = self._call("POST", "/update_weights", body)
        self.last_server_load_s = float(reply.get("seconds", 0.0))
        self._note_reply_boot(reply)

    # ------------------------------------------------------------------ weight group

    def _open_group(self) -> None:
        """Host the group's store, ask the server to join, join it: the server connects to
        ``group_host`` (the trainer's address as the server sees it, where the store listens),
        and each side proves the per-group secret this request hands the server."""
        from opsd_mm.rollout.transport import GroupAuthError, host_store, new_secret, open_group

        try:
            store = host_store(self.group_host, self.group_port, self.timeout_s)
        except OSError as e:
            raise ServerError(
                f"rollout.server_group_host={self.group_host} port {self.group_port}: the weight "
                f"group's store cannot listen there ({e}); it must be an address of this machine "
                "that the server can reach"
            ) from None
        port, secret = store.port, new_secret()
        joined: dict[str, Any] = {}

        def join(store: Any) -> None:
            try:
                joined["group"] = open_group(
                    self.group_host,
                    port,
                    0,
                    self.transport,
                    self.timeout_s,
                    secret=secret,
                    store=store,
                )
            except BaseException as e:  # reported below
                joined["error"] = e

        # Joining blocks until both sides are in; the server's reply says whether it got in,
        # so a refusal (no CUDA for nccl, an unreachable host) surfaces at once. The thread
        # owns the store: it closes once the group has formed.
        thread = threading.Thread(target=join, args=(store,), daemon=True, name="opsd-weight-group")
        del store
        thread.start()
        body = {
            "host": self.group_host,
            "port": port,
            "backend": self.transport,
            "timeout_s": min(self.timeout_s, 3600.0),  # the server's bound on a join
            "secret": secret,
        }
        try:
            reply = self._call("POST", "/init_weight_group", body, retries=0)
        finally:
            thread.join(self.timeout_s)
        if "group" not in joined:
            error = joined.get("error", "timed out")
            what = "refused" if isinstance(error, GroupAuthError) else "not formed"
            raise ServerError(
                f"weight group ({self.transport}) with {self.url} via "
                f"{self.group_host}:{port} {what}: {error}"
            )
        self._note_reply_boot(reply)
        self.group = joined["group"]
        log.info("weight group (%s) with %s open", self.transport, self.url)

    def _send_over_group(self, model: torch.nn.Module | None) -> None:
        """Broadcast ``model``'s merged weights to the server while it loads them; a failure
        (the server restarted or died: its end of the group is gone) re-opens the group and
        sends again, up to ``retries`` times."""
        if model is None:
            return
        for attempt in range(self.retries + 1):
            try:
                if self.group is None:
                    self.health_wait()
                    self._open_group()
                self._send_once(model)
                return
            except ServerError as e:
                self._drop_group()  # re-formed on the next attempt
                if e.status is not None and 400 <= e.status < 500 or attempt == self.retries:
                    raise ServerError(
                        f"weight sync over {self.transport} to {self.url} failed "
                        f"{attempt + 1} time(s), last: {e} "
                        f"(rollout.server_retries={self.retries})",
                        e.status,
                        e.reply,
                    ) from None
                log.warning("weight sync over %s: %s; retry %d", self.transport, e, attempt + 1)

    def _send_once(self, model: torch.nn.Module) -> None:
        """One sync over the open group: the sends run on a thread while this one waits for
        the server's reply, which comes once it has loaded the last tensor (or failed)."""
        from opsd_mm.rollout.transport import abort_send, send_weights

        device = torch.device("cpu")
        if self.transport == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        sent: dict[str, Any] = {}
        group = self.group  # the thread keeps this one, whatever a failure does to self.group

        def send() -> None:
            try:
                try:
                    manifest = sync_manifest(model)
                except BaseException as e:
                    abort_send(group, e, device)
                    raise
                sent["bytes"] = send_weights(group, manifest, iter_sync_weights(model), device)
            except BaseException as e:  # the reply below says what happened
                sent["error"] = e

        thread = threading.Thread(target=send, daemon=True, name="opsd-weight-send")
        thread.start()
        body = {"transport": "group", "version": self.weight_version}
        reply = self._call("POST", "/update_weights", body, retries=0)
        thread.join(self.timeout_s)
        if "bytes" not in sent:
            raise ServerError(f"weight send failed: {sent.get('error', 'timed out')}")
        self.last_sync_bytes = sent["bytes"]
        self.last_server_load_s = float(reply.get("seconds", 0.0))
        self._note_reply_boot(reply)

    def health_wait(self) -> dict[str, Any]:
        """``/health`` with the retries and backoff of every call: waits for a restarting
        server; notes a new boot id without re-syncing (the caller is about to)."""
        reply = self.health()
        self._note_reply_boot(reply)
        return reply

    def _note_reply_boot(self, reply: dict[str, Any]) -> None:
        """A reply to a sync call from a server restarted since the last one: it holds the
        weights it was just sent, so only the new boot id is recorded."""
        if reply["boot_id"] != self.boot_id:
            log.warning(
                "generation server restarted (boot %s -> %s); it has the weights again",
                self.boot_id,
                reply["boot_id"],
            )
            self.boot_id = reply["boot_id"]
            self.restarts += 1

    def health(self, retries: int | None = None) -> dict[str, Any]:
        """``/health``'s reply, also when it is 503 (``"ok": false``: weights left incomplete
        by a failed reload, which the next sync replaces)."""
        try:
            return self._call("GET", "/health", None, retries=retries)
        except ServerError as e:
            if e.status == 503 and "boot_id" in e.reply:
                log.warning("generation server %s: %s", self.url, e.reply.get("error"))
                return e.reply
            raise

    @classmethod
    def from_config(
        cls, cfg: Any, model: torch.nn.Module, model_path: str, processor: Any
    ) -> ServerEngine:
        """``rollout.engine=vllm_server``: checks the server is up and loads the trainer's
        weights into it, before step 1 (a long-lived server may hold another run's). A fixed
        LoRA teacher scored on the server gets :class:`AdapterServerEngine`: the base weights are
        that teacher, so syncs send the student's adapter alone."""
        if cls is ServerEngine and cfg.teacher.scoring == "server" and cfg.teacher.kind == "fixed":
            cls = AdapterServerEngine
        r = cfg.rollout
        engine = cls(
            r.server_url,
            r.server_sync_dir or Path(cfg.run_dir) / "engine_weights",
            eos_token_ids=processor.eos_token_ids,
            suppress_token_ids=processor.suppress_token_ids,
            token=r.server_token,
            timeout_s=r.server_timeout_s,
            retries=r.server_retries,
            transport=r.server_transport,
            group_host=r.server_group_host,
            group_port=r.server_group_port,
            trains_while_generating=r.async_,
            takeover=r.server_takeover,
            run=str(Path(cfg.run_dir).resolve()),
            label=f"the run in {Path(cfg.run_dir).resolve()} (pid {os.getpid()} on "
            f"{socket.gethostname()})",
        )
        engine.sync_weights(model, version=0)
        return engine


# ----------------------------------------------------------------------------- adapter sync


def _peft_model(model: torch.nn.Module) -> Any:
    inner = getattr(model, "module", model)
    if not (hasattr(inner, "disable_adapter") and hasattr(inner, "save_pretrained")):
        raise ServerError(
            "teacher.kind=fixed with teacher.scoring=server serves the LoRA adapter apart from "
            "the base: it needs model.lora.enabled=true"
        )
    return inner


class AdapterServerEngine(ServerEngine):
    """``ServerEngine`` whose sync sends the LoRA adapter alone; the base stays on the server.

    A fixed LoRA teacher scored on the generation server: the base weights serve as the teacher,
    the LoRA adapter as the student (``teacher.kind=fixed teacher.scoring=server``).

    Why it is exact: under LoRA the fixed teacher is the base model with the adapter switched off,
    and the base never trains. So the server holds the base weights once, generates with the
    student's adapter on top (vLLM's LoRA), and scores the teacher with the base alone
    (``VLLMEngine.score`` never applies the adapter). Unlike the live teacher, the teacher's
    weights never change, so ``rollout.sync_every`` and ``rollout.async`` are free: only the
    student's adapter goes stale between syncs, exactly as with merged weights.

    A sync writes the adapter only (peft's ``save_pretrained``: megabytes, not the model) and asks
    the server to load it (``POST /update_adapter``). The base weights are written once, from the
    trainer's model with the adapter disabled, and loaded before step 1 and again after a server
    restart (``POST /update_weights``), so a long-lived server that held other weights, or one
    restarted from another checkpoint, still scores with this run's base.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.base_dir = self.sync_dir / "base"
        self.adapter_dir = self.sync_dir / "adapter"
        self.base_written = False
        self._base_boot: str | None = None  # the boot id of the server that holds our base

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """Write the adapter (and, the first time, the base) and have the server load them, as
        ``version``. Under several processes only the main one writes and calls."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not dist or torch.distributed.get_rank() == 0:
            start = time.perf_counter()
            peft = _peft_model(model)
            self.last_sync_bytes = 0
            if not self.base_written:
                with peft.disable_adapter():
                    self.last_sync_bytes += save_sync_weights(peft, self.base_dir)
                self.base_written = True
            peft.save_pretrained(str(self.adapter_dir))
            self.last_sync_bytes += sum(f.stat().st_size for f in self.adapter_dir.iterdir())
            self.weight_version = self.weight_version + 1 if version is None else version
            self.synced = True
            self._reload()
            self.last_sync_s = time.perf_counter() - start
        if dist:
            torch.distributed.barrier()

    def _reload(self) -> None:
        """The base (when this server boot does not hold it yet), then the adapter; redone when
        the server restarts between the calls."""
        for _ in range(self.retries + 1):
            if self._base_boot != self.boot_id:
                body = {"path": str(Path(self.base_dir).resolve()), "version": self.weight_version}
                reply = self._call("POST", "/update_weights", body)
                if not self._same_boot(reply):
                    continue
                self._base_boot = self.boot_id
            body = {"path": str(Path(self.adapter_dir).resolve()), "version": self.weight_version}
            if self._same_boot(self._call("POST", "/update_adapter", body)):
                return
        raise ServerError(f"generation server {self.url} kept restarting; giving up")

    def _same_boot(self, reply: dict[str, Any]) -> bool:
        if reply["boot_id"] == self.boot_id:
            return True
        log.warning("generation server restarted (boot %s -> %s)", self.boot_id, reply["boot_id"])
        self.boot_id = reply["boot_id"]
        self.restarts += 1
        return False
