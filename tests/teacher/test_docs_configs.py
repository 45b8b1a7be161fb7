"""The configs of docs/teachers.md load: every YAML block is a valid config, and the three
of "One config each" are the self-distillation, distillation and both they say they are."""

from __future__ import annotations

import re

import yaml

from opsd_mm.config import load_config

from .conftest import ROOT

DOC = ROOT / "docs" / "teachers.md"


def _blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_every_yaml_block_of_the_page_is_a_valid_config(tmp_path):
    blocks = _blocks()
    assert len(blocks) == 4
    configs = []
    for i, text in enumerate(blocks):
        path = tmp_path / f"block{i}.yaml"
        path.write_text(text)
        assert isinstance(yaml.safe_load(text), dict)
        configs.append(load_config(path))
    own, distill, both, routed = configs
    assert own.teacher.kind == "fixed" and own.processor.teacher_template == "opsd_teacher_v1"
    assert (
        distill.teacher.kind == "model" and distill.processor.teacher_template == "same_as_student"
    )
    assert both.teacher.kind == "model" and both.processor.teacher_template == "opsd_teacher_v1"
    assert set(routed.teachers) == {"math", "code", "own"} and routed.teacher.route_by == "source"
