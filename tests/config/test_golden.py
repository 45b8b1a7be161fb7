"""The resolved config of every shipped recipe stays byte-identical.

tests/config/golden/<name>.yaml is ``save_config(resolve_data(load_config(p)))`` of
configs/<name>.yaml, generated once from the code before the fields' documentation was rewritten;
a difference here is a behaviour change (a field, type or default moved). When a recipe or a
default changes on purpose, regenerate the copy and review the diff:

    python -c "from pathlib import Path; from opsd_mm.config import load_config, save_config; \
from opsd_mm.data.presets import resolve_data; p = Path('configs/NAME.yaml'); \
save_config(resolve_data(load_config(p)), Path('tests/config/golden') / p.name)"
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_mm.config import load_config, save_config
from opsd_mm.data.presets import resolve_data

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_shipped_config_has_a_golden_copy():
    assert sorted(p.name for p in GOLDEN.glob("*.yaml")) == [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_resolved_config_matches_the_golden_copy(path, tmp_path):
    out = tmp_path / path.name
    save_config(resolve_data(load_config(path)), out)
    assert out.read_text() == (GOLDEN / path.name).read_text(), (
        f"the resolved config of configs/{path.name} changed; if on purpose, regenerate "
        f"tests/config/golden/{path.name} (see this module's docstring) and review the diff"
    )
