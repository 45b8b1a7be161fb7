"""The table of rollout engines: every ``rollout.engine`` name builds its class through one
row, imported lazily; which engines can score a teacher is a protocol, not ``hasattr``."""

from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest

from opsd_mm.config import RolloutConfig
from opsd_mm.rollout.base import ENGINES, RolloutEngine, ScoringEngine, engine_class


def test_the_table_and_the_config_name_the_same_engines():
    names = typing.get_args(typing.get_type_hints(RolloutConfig)["engine"])
    assert set(ENGINES) == set(names)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_row_names_a_class_that_builds_itself(name):
    cls = engine_class(name)
    assert callable(getattr(cls, "from_config", None)), f"{cls.__name__} has no from_config"
    for method in ("generate", "sync_weights"):
        assert callable(getattr(cls, method, None)), f"{cls.__name__}.{method}"


def test_which_engines_score_a_teacher():
    """The generation server's client and the colocated vLLM engine score; HF does not."""
    assert issubclass(engine_class("vllm_server"), ScoringEngine)
    assert issubclass(engine_class("vllm"), ScoringEngine)
    assert not issubclass(engine_class("hf"), ScoringEngine)
    assert issubclass(engine_class("hf"), RolloutEngine)


def test_unknown_engine_names_the_choices():
    with pytest.raises(ValueError, match="vllm_server"):
        engine_class("sglang")


def test_the_table_imports_no_engine_until_one_is_built():
    code = (
        "import json, sys\n"
        "import opsd_mm.rollout.base\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('opsd_mm.rollout'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == ["opsd_mm.rollout", "opsd_mm.rollout.base"]


def test_the_server_client_imports_nothing_of_the_vllm_side():
    """The trainer's environment has no vLLM: the client reaches the server's helpers through
    ``opsd_mm.rollout.shared`` only, never through the colocated engine or the server."""
    code = (
        "import json, sys\n"
        "import opsd_mm.rollout.client\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('opsd_mm', 'vllm')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    vllm_side = [m for m in loaded if m.startswith(("vllm", "opsd_mm.rollout.vllm_engine"))]
    assert not vllm_side and "opsd_mm.rollout.server" not in loaded, loaded
