"""Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C) end a run cleanly.

The first signal only sets a flag: the step in progress finishes, a checkpoint is written, then
:class:`TrainingInterrupted` is raised (the command line exits 128 + the signal number). A
second signal gets the previous handler at once. Under several processes the processes agree
on the flag in one collective after every step, so they all save and stop together.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT: the step in progress finished and a checkpoint was written.
    ``exit_code`` is the shell's 128 + signal number (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped after step {step}; checkpoint {checkpoint}; continue with --resume"
        )


class StopSignals:
    """The stop flag of one run: :meth:`catching` installs the handlers around the loop,
    :meth:`requested` says (agreed over processes) whether to stop after this step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextmanager
    def catching(self, next_step: Callable[[], int]) -> Iterator[None]:
        """Handlers for SIGTERM and SIGINT while the block runs (only on the main thread);
        ``next_step()`` names the step being finished in the log line."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: Any) -> None:
            if self.signum is not None:  # second signal: stop now
                signal.signal(signum, previous[signum])
                signal.raise_signal(signum)
                return
            self.signum = signum
            log.warning(
                "%s: finishing step %d, then writing a checkpoint and stopping "
                "(send it again to stop at once)",
                signal.Signals(signum).name,
                next_step(),
            )

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def requested(self, accelerator: Any) -> int:
        """The stop signal any process received (0: none); a collective with >1 process."""
        signum = self.signum or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([signum], dtype=torch.int64, device=accelerator.device)
            signum = int(accelerator.gather(flag).max().item())
        return signum
