"""A fixed LoRA teacher scored on the generation server: the base weights serve as the teacher,
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

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from opsd_mm.rollout.client import ServerEngine, ServerError
from opsd_mm.rollout.shared import save_sync_weights

log = logging.getLogger(__name__)


def _peft_model(model: torch.nn.Module) -> Any:
    inner = getattr(model, "module", model)
    if not (hasattr(inner, "disable_adapter") and hasattr(inner, "save_pretrained")):
        raise ServerError(
            "teacher.kind=fixed with teacher.scoring=server serves the LoRA adapter apart from "
            "the base: it needs model.lora.enabled=true"
        )
    return inner


class AdapterServerEngine(ServerEngine):
    """``ServerEngine`` whose sync sends the LoRA adapter alone; the base stays on the server."""

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
