"""``opsd-mm config show``: the config as training uses it, each value with its origin.

Origins: ``default`` (the dataclass default), ``file`` (set in the YAML recipe), ``override`` (a
command-line ``key=value``) or ``resolved`` (filled in by resolution: ``loss.temperature`` from
``rollout.temperature``, a preset's ``data.split`` / ``processor.teacher_template``). Found by
comparison, not by instrumenting the loader: which keys the recipe and the overrides set (merged
as :func:`~opsd_mm.config.load.apply_overrides` merges them), and where the resolved config
differs from the config built from them, a difference only resolution can make.

The data presets live above this package (``opsd_mm.data.presets``), so the caller passes that
resolution in (``resolve``); the CLI passes ``resolve_data``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opsd_mm.config.checks import resolve_config
from opsd_mm.config.load import (
    apply_overrides,
    build_config,
    config_to_dict,
    leaves,
    parse_override,
    read_config_file,
)
from opsd_mm.config.reference import yaml_value
from opsd_mm.config.sections import RunConfig

ORIGINS = ("default", "file", "override", "resolved")


def set_keys(file_raw: Mapping[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, str]:
    """Dotted key -> ``file`` or ``override`` for every key the recipe's raw mapping or a
    parsed override (:func:`~opsd_mm.config.load.parse_override`) sets, merged as
    ``load_config`` merges them: a later override wins, and one that sets a whole section
    (``model.lora={r: 4}``) replaces what the file set in it."""
    origin = dict.fromkeys(leaves(file_raw), "file")
    for key, value in overrides:
        origin = {k: o for k, o in origin.items() if k != key and not k.startswith(key + ".")}
        if isinstance(value, Mapping):
            origin.update(dict.fromkeys(leaves(value, key + "."), "override"))
        else:
            origin[key] = "override"
    return origin


def value_origins(given: RunConfig, final: RunConfig, set_by: Mapping[str, str]) -> dict[str, str]:
    """Dotted key -> origin of each value of ``final``, the resolved form of ``given`` (the config
    built from the recipe and the overrides). A value resolution changed is ``resolved``; any
    other is where ``set_by`` (:func:`set_keys`) says it was set, else ``default``."""
    before = leaves(config_to_dict(given))
    return {
        key: "resolved" if before.get(key) != value else set_by.get(key, "default")
        for key, value in leaves(config_to_dict(final)).items()
    }


def format_config(values: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    """One ``key: value  # origin`` line per dotted key of the nested mapping ``values`` (as
    :func:`~opsd_mm.config.load.config_to_dict` gives it: secrets masked), values as YAML
    writes them."""
    return "".join(
        f"{key}: {yaml_value(value)}  # {origins[key]}\n" for key, value in leaves(values).items()
    )


def show_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    resolve: Callable[[RunConfig], RunConfig] | None = None,
) -> str:
    """The resolved config of the recipe ``path`` with ``overrides`` (``key=value``) as
    :func:`format_config` lines: what ``load_config`` then ``resolve`` give, as training uses
    it. Errors are those of ``load_config`` (a ConfigError naming the file or the key)."""
    file_raw = read_config_file(path)
    parsed = [parse_override(item) for item in overrides]
    given = build_config(apply_overrides(file_raw, parsed))
    final = resolve_config(given)
    if resolve is not None:
        final = resolve(final)
    origins = value_origins(given, final, set_keys(file_raw, parsed))
    return format_config(config_to_dict(final), origins)
