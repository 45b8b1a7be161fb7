"""The offline demo (``opsd-mm demo``), installed as ``opsd_mm.demo``: OPSD teaching tiny
models, offline, something only the privileged context knows; with our own SFT loop for the
warm starts and the baseline.

A package beside ``processors/`` and ``eval/``, wired by ``opsd_mm.cli`` like them: the core
never imports it. It builds its trainer through the same set-up path as ``opsd-mm train``
(``opsd_mm.train.build``).
"""

from opsd_mm.demo.run import Wiring, add_demo_arguments, run_demo, seed_list

__all__ = ["Wiring", "add_demo_arguments", "run_demo", "seed_list"]
