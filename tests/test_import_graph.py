"""The core's import graph: ``import opsd_mm`` loads no processor, evaluation or demo module;
the core's sub-packages import each other only down the layering below; no module imports
another that (directly or not) imports it back.

Why: the core is modality-agnostic, and only ``cli.py`` wires ``opsd_mm.processors``,
``opsd_mm.eval`` and the demo into it. The layering keeps the packages readable one at a time
(config at the bottom, train and cli at the top); an import cycle (even through a
function-level import) means two modules that can only be understood together.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import opsd_mm

CORE = Path(opsd_mm.__file__).parent
ROOT = CORE.parent
WIRED = ("opsd_mm.processors", "opsd_mm.eval", "opsd_mm.demo")
# The only core module allowed to import the wired packages.
WIRING_MODULES = {"opsd_mm.cli"}

# The core's layers, bottom first. A module may import modules of its own top-level unit
# (package or module) and of units in LOWER layers only; two units of one layer never import
# each other.
LAYERS: list[set[str]] = [
    {"errors"},
    {"config", "types"},
    {"model", "data"},
    {"rollout"},
    {"teacher"},
    {"loss"},
    {"train"},
    {"cli", "testing"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    """The absolute name of a (possibly relative) ``from`` import."""
    if level == 0:
        return module
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(path: Path) -> set[str]:
    """Every ``opsd_mm...`` module a file imports, at module level or inside functions
    (``from opsd_mm.x import y`` counts as ``opsd_mm.x.y`` when that is a module, else as
    ``opsd_mm.x``)."""
    current = _module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "opsd_mm"}
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module or "", node.level, current, path.name == "__init__.py")
            if module.split(".")[0] != "opsd_mm":
                continue
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.add(sub if sub in _all_modules() else module)
    return found


_MODULES: set[str] = set()


def _all_modules() -> set[str]:
    if not _MODULES:
        _MODULES.update(_module_name(p) for p in CORE.rglob("*.py"))
    return _MODULES


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(path): {m for m in _imports(path) if m != _module_name(path)}
        for path in sorted(CORE.rglob("*.py"))
    }


def _unit(module: str) -> str:
    """The top-level unit of a core module: ``opsd_mm.loss.fused`` -> ``loss``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_covers_every_sub_package():
    """The walk is recursive: modules of every sub-package, in dotted names."""
    graph = _graph()
    assert "opsd_mm.loss.fused" in graph and "opsd_mm.model.tiny.vl" in graph
    units = {_unit(m) for m in graph} - {"__init__"}
    assert units == set(RANK), f"units outside the layering table: {units ^ set(RANK)}"


def test_only_cli_imports_processors_eval_and_demo():
    bad = {
        name: sorted(m for m in deps if m.startswith(WIRED))
        for name, deps in _graph().items()
        if name not in WIRING_MODULES
    }
    assert not {k: v for k, v in bad.items() if v}, bad


def _against_layering(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow of ``graph`` that points to the same layer (another unit) or upwards."""
    against = []
    for name, deps in graph.items():
        unit = _unit(name)
        if unit == "__init__":
            continue
        for dep in deps:
            dep_unit = _unit(dep)
            if dep.startswith(WIRED) or dep_unit in (unit, "__init__"):
                continue
            if RANK[dep_unit] >= RANK[unit]:
                against.append(f"{name} -> {dep} ({unit} is not above {dep_unit})")
    return sorted(against)


def test_imports_follow_the_layering():
    assert not _against_layering(_graph()), "\n".join(_against_layering(_graph()))


def test_the_layering_check_catches_arrows_against_it():
    """The check itself, on a made-up graph: up (config -> train) and sideways (model ->
    data) are reported; down (train -> config) and within a package are not."""
    graph = {
        "opsd_mm.config.load": {"opsd_mm.train.trainer", "opsd_mm.config.checks"},
        "opsd_mm.model.load": {"opsd_mm.data.load"},
        "opsd_mm.train.trainer": {"opsd_mm.config", "opsd_mm.loss.fused", "opsd_mm.errors"},
    }
    assert _against_layering(graph) == [
        "opsd_mm.config.load -> opsd_mm.train.trainer (config is not above train)",
        "opsd_mm.model.load -> opsd_mm.data.load (model is not above data)",
    ]


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
    assert "torch" not in loaded, "import opsd_mm must not import torch (no import-time work)"


def test_pyproject_lists_every_package():
    """A new sub-package left out of pyproject.toml would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    roots = {name: ROOT / path for name, path in setup["package-dir"].items()}
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if any(p.startswith(".") or p == "__pycache__" for p in rel):
                continue
            found.add(".".join((name, *rel)) if rel else name)
    # Nested roots (opsd_mm.processors lives in processors/, not opsd_mm/processors/).
    assert found == listed, f"missing: {sorted(found - listed)}; stale: {sorted(listed - found)}"
