"""``opsd-mm config reference`` (docs/config.md from the fields' comments) and ``opsd-mm config
show`` (the resolved config with each value's origin)."""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from opsd_mm import cli
from opsd_mm.config import (
    RunConfig,
    TeacherSpec,
    config_to_dict,
    load_config,
    parse_override,
    reference_markdown,
    show_config,
)
from opsd_mm.config.load import leaves
from opsd_mm.config.reference import (
    all_field_docs,
    config_key,
    config_sections,
    field_comments,
    section_doc,
)
from opsd_mm.config.show import set_keys, value_origins
from opsd_mm.data.presets import resolve_data

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "config.md"
TINY = ROOT / "configs" / "tiny_text.yaml"
WEMATH = ROOT / "configs" / "qwen2.5_vl_7b_wemath.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


# ----------------------------------------------------------------------------- reference


def test_checked_in_page_is_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/config.md is out of date: regenerate with "
        "`opsd-mm config reference --output docs/config.md` (make config-reference)"
    )


def test_every_field_and_section_is_documented():
    missing = [row.key for row in all_field_docs() if not row.doc]
    assert not missing, (
        "config keys without a comment above their field in opsd_mm/config/sections.py: "
        + ", ".join(missing)
    )
    bare = [cls.__name__ for _, cls in config_sections() if not section_doc(cls)]
    assert not bare, f"config sections without a class docstring: {', '.join(bare)}"


def test_the_reference_covers_every_key_once():
    keys = [row.key for row in all_field_docs()]
    assert len(keys) == len(set(keys))
    sections = {prefix for prefix, _ in config_sections() if prefix}
    # A mapping of named sections is documented once, under the name NAME.
    named = dataclasses.replace(RunConfig(), teachers={"NAME": TeacherSpec()})
    expected = leaves(config_to_dict(RunConfig())).keys() | leaves(config_to_dict(named)).keys()
    assert set(keys) == expected | (sections - {"teachers.NAME"})  # a heading, not a key
    assert "teachers" in keys and "teachers.NAME.model.name_or_path" in keys
    assert "rollout.async" in keys and "model.lora.r" in keys and "data.columns.images" in keys
    assert [p for p, _ in config_sections()][:3] == ["", "model", "model.lora"]


def test_types_and_defaults_read_as_yaml():
    rows = {row.key: row for row in all_field_docs()}
    assert (rows["rollout.async"].type, rows["rollout.async"].default) == ("`bool`", "false")
    assert rows["loss.temperature"].type == "`float | null`"
    assert rows["loss.temperature"].default == "null"
    assert rows["loss.divergence"].type == (
        "one of `jsd`, `forward_kl`, `reverse_kl`, `sampled_pg`"
    )
    assert rows["logging.report_to"].type == "`list[str]`"
    assert rows["logging.report_to"].default == "[]"
    assert rows["trainer.lr"].default == "0.0002"
    assert rows["model.lora"].section is not None and rows["model.lora"].default == ""
    # Every default, read back as YAML, is the dataclass default.
    for prefix, cls in config_sections():
        instance = cls()
        for f in dataclasses.fields(cls):
            row = rows[f"{prefix}.{config_key(f.name)}".lstrip(".")]
            if row.section is None:
                assert yaml.safe_load(row.default) == getattr(instance, f.name), row.key


def test_every_table_row_has_four_cells():
    """A ``|`` in a value or a comment (the LoRA regex, KL(T||S)) must not split a cell."""
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| ")]
    assert len(rows) > 100
    for line in rows:
        cells = re.split(r"(?<!\\)\|", line)[1:-1]
        assert len(cells) == 4, line


# A section as sections.py writes one, for the comment reader alone.
@dataclass(frozen=True)
class _Sample:
    """Docstring of
    the section."""

    # First line
    # and second line.
    a: int = 1
    b: int = 2  # a trailing comment is not documentation
    # Detached by a blank line: not documentation.

    c: int = 3
    # Above a field spanning lines.
    d: list[int] = field(
        default_factory=lambda: [1, 2],
    )  # fmt: skip
    # The field's config key is ``async``.
    async_: bool = False


def test_field_comments_are_the_block_directly_above():
    assert field_comments(_Sample) == {
        "a": "First line and second line.",
        "d": "Above a field spanning lines.",
        "async_": "The field's config key is ``async``.",
    }
    assert section_doc(_Sample) == "Docstring of the section."
    assert config_key("async_") == "async"


def test_the_config_package_stays_at_the_bottom_of_the_layering():
    """opsd_mm.config imports nothing of the project but itself, opsd_mm.errors and
    opsd_mm.types: the presets ``show`` needs are passed in by the CLI."""
    allowed = ("opsd_mm.config", "opsd_mm.errors", "opsd_mm.types")
    bad = []
    for path in sorted((ROOT / "opsd_mm" / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] == "opsd_mm" and not name.startswith(allowed):
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad


# ----------------------------------------------------------------------------- show


def _shown(text: str) -> dict[str, tuple[str, str]]:
    """``key: value  # origin`` lines -> key -> (value text, origin)."""
    out = {}
    for line in text.splitlines():
        head, origin = line.rsplit("  # ", 1)
        key, value = head.split(": ", 1)
        out[key] = (value, origin)
    return out


def test_show_names_each_values_origin():
    shown = _shown(show_config(TINY, ["trainer.max_steps=3", "rollout.n=4"], resolve_data))
    assert shown["trainer.max_steps"] == ("3", "override")
    assert shown["rollout.n"] == ("4", "override")  # also set in the file: the override wins
    assert shown["model.dtype"] == ("float32", "file")
    assert shown["model.lora.r"] == ("8", "file")  # a flow mapping in the file
    assert shown["model.attn_implementation"] == ("sdpa", "default")
    assert shown["loss.temperature"] == ("1.0", "resolved")  # from rollout.temperature
    assert shown["data.split"] == ("train", "resolved")
    assert shown["rollout.async"] == ("false", "default")
    assert set(shown) == set(leaves(config_to_dict(RunConfig())))


def test_show_resolves_a_preset():
    shown = _shown(show_config(WEMATH, [], resolve_data))
    assert "data.split: standard  # resolved" in show_config(WEMATH, [], resolve_data)
    assert shown["data.preset"] == ("wemath2_standard", "file")
    assert shown["processor.teacher_template"] == ("hint_v1", "resolved")
    # Without the data resolution, only the config's own.
    assert _shown(show_config(WEMATH))["data.split"] == ("null", "default")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_show_prints_what_training_uses(path):
    shown = _shown(show_config(path, [], resolve_data))
    used = leaves(config_to_dict(resolve_data(load_config(path))))
    assert {k: yaml.safe_load(v) for k, (v, _) in shown.items()} == used


def test_show_masks_the_server_token(tmp_path):
    text = show_config(TINY, ["rollout.server_token=s3cret"], resolve_data)
    assert "s3cret" not in text
    assert "rollout.server_token: '***'  # override" in text.splitlines()
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  server_token: s3cret\n")
    text = show_config(p)
    assert "s3cret" not in text and "rollout.server_token: '***'  # file" in text


def test_set_keys_merge_as_load_config_does():
    file_raw = {"model": {"dtype": "float32", "lora": {"r": 8, "alpha": 16}}, "seed": 1}
    overrides = [
        parse_override("model.lora={r: 4}"),  # replaces the file's whole model.lora mapping
        parse_override("seed=2"),
        parse_override("loss.beta=0.1"),
    ]
    assert set_keys(file_raw, overrides) == {
        "model.dtype": "file",
        "model.lora.r": "override",
        "seed": "override",
        "loss.beta": "override",
    }


def test_value_origins_compare_given_and_resolved():
    given = RunConfig()
    final = dataclasses.replace(given, loss=dataclasses.replace(given.loss, temperature=1.0))
    origins = value_origins(given, final, {"seed": "file", "trainer.lr": "override"})
    assert origins["loss.temperature"] == "resolved"
    assert origins["seed"] == "file" and origins["trainer.lr"] == "override"
    assert origins["loss.beta"] == "default"


# ----------------------------------------------------------------------------- CLI


def test_cli_config_reference(tmp_path, capsys):
    assert cli.main(["config", "reference"]) == 0
    assert capsys.readouterr().out == reference_markdown()
    out = tmp_path / "config.md"
    assert cli.main(["config", "reference", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == reference_markdown()


def test_cli_config_show(capsys):
    assert cli.main(["config", "show", str(TINY), "trainer.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "trainer.max_steps: 3  # override" in out.splitlines()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["loss.bta=1"], "config error: unknown config key 'loss.bta'; valid keys here: "),
        (["trainer.max_steps=0"], "config error: trainer.max_steps=0 is out of range"),
    ],
)
def test_cli_config_show_errors_are_one_line_exit_2(capsys, argv, message):
    assert cli.main(["config", "show", str(TINY), *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_config_show_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert cli.main(["config", "show", str(missing)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"config error: config file not found: {missing}"
    ]
