"""The core's import graph: ``import opsd_mm`` loads no processor, evaluation or demo module,
and no module of the core imports another that (directly or not) imports it back.

Why: the core is modality-agnostic; only ``cli.py`` wires ``opsd_mm.processors``,
``opsd_mm.eval`` and the demo into it. An import cycle (even through a function-level import)
means two modules that can only be understood together.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import opsd_mm

CORE = Path(opsd_mm.__file__).parent
WIRED = ("opsd_mm.processors", "opsd_mm.eval", "opsd_mm.demo")
# The only core module allowed to import the wired packages.
WIRING_MODULES = {"opsd_mm.cli"}


def _module_name(path: Path) -> str:
    return "opsd_mm." + path.stem if path.stem != "__init__" else "opsd_mm"


def _imports(path: Path) -> set[str]:
    """Every ``opsd_mm...`` module a file imports, at module level or inside functions
    (``from opsd_mm import x`` counts as ``opsd_mm.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "opsd_mm"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "opsd_mm":
                continue
            if node.module == "opsd_mm":
                found |= {f"opsd_mm.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(CORE.glob("*.py")):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if m != name}
    return graph


def test_only_cli_imports_processors_eval_and_demo():
    bad = {
        name: sorted(m for m in deps if m.startswith(WIRED))
        for name, deps in _graph().items()
        if name not in WIRING_MODULES
    }
    assert not {k: v for k, v in bad.items() if v}, bad


def test_no_import_cycles_in_the_core():
    graph = _graph()
    core = {n: {m for m in deps if m in graph} for n, deps in graph.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(core[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(core):
        if node not in state:
            visit(node, [node])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_importing_the_core_loads_no_wired_package():
    """In a fresh interpreter: ``import opsd_mm`` and every core module but cli.py."""
    modules = sorted(n for n in _graph() if n not in WIRING_MODULES)
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError:\n"  # optional extras (vllm)
        "        pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    wired = [m for m in loaded if m.startswith(WIRED)]
    assert not wired, wired


def test_import_opsd_mm_alone_is_light():
    code = "import json, sys, opsd_mm; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith(WIRED)]
