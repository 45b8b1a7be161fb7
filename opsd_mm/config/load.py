"""Building a :class:`~opsd_mm.config.sections.RunConfig`: YAML (safe loader) and dotted
``key=value`` overrides -> frozen dataclasses, strict keys and types; and writing one back.

Why our own loader rather than a config framework: the contract is small (nested frozen
dataclasses, strict keys and types, overrides), and errors must name the offending key in the
user's terms (``loss.beta``), which the generic libraries do not do well.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from opsd_mm.config.checks import resolve_config
from opsd_mm.config.sections import RunConfig
from opsd_mm.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _NotFinite(ConfigError):
    """A float key given infinity or NaN."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _NotFinite:
                raise  # a number, the right type: the message says what is wrong with it
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and args[:1] == (str,):
            # ``logging.report_to=tensorboard`` (or ``a,b``): a string is a comma-separated list.
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        # A mapping of names (``teachers``, ``teacher.routes``): YAML keys are read as text
        # (``1: big`` names the value "1"), each value checked against the value type.
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):  # .inf, .nan, 1e400 (checks.INFINITE_FLOAT_KEYS: none)
            raise _NotFinite(f"{key}={number!r} is out of range: must be a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


# Config keys that are Python keywords: the YAML / override spelling -> the dataclass field.
_KEY_TO_FIELD = {"async": "async_"}
_FIELD_TO_KEY = {v: k for k, v in _KEY_TO_FIELD.items()}


def _key_hints(cls: type) -> dict[str, Any]:
    """The annotations of ``cls``'s fields under their config spelling (``async``, not
    ``async_``)."""
    return {_FIELD_TO_KEY.get(k, k): tp for k, tp in typing.get_type_hints(cls).items()}


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = _key_hints(cls)
    for k in raw:
        if k not in hints:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(
                f"unknown config key '{where}'; valid keys here: {', '.join(sorted(hints))}"
            )
    kwargs = {}
    for k, v in raw.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[_KEY_TO_FIELD.get(k, k)] = _coerce(v, hints[k], where)
    required = [
        _FIELD_TO_KEY.get(f.name, f.name)
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in kwargs
    ]
    if required:  # a section without defaults for every key (a view operation's ``op``)
        where = f"{prefix}: " if prefix else ""
        raise ConfigError(f"{where}missing required key(s) {', '.join(required)}")
    return cls(**kwargs)


def _field_type(key: str) -> Any:
    """The annotation of a dotted key, or a ConfigError naming it."""
    cls: Any = RunConfig
    tp: Any = None
    parts = key.split(".")
    for i, part in enumerate(parts):
        if typing.get_origin(cls) is dict:
            # A name in a mapping (``teachers.big``): any name; its value has the value type.
            tp = cls = typing.get_args(cls)[1]
            continue
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown config key '{key}'")
        hints = _key_hints(cls)
        if part not in hints:
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"unknown config key '{where}'; valid keys here: {', '.join(sorted(hints))}"
            )
        tp = hints[part]
        cls = tp
    return tp


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``a.b``, parsed value). Values are YAML scalars (``3``, ``true``,
    ``null``, ``[a, b]``), except for string fields, which take the raw text."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. trainer.max_steps=3)")
    key, text = item.split("=", 1)
    key = key.strip()
    tp = _field_type(key)
    accepts_str = tp is str or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)
    )
    if accepts_str and text not in ("null", "None", "~"):
        return key, text
    try:
        return key, _safe_load(text, key) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {text!r}: {e}") from e


# The deepest nesting a config can mean: a section, a nested section (model.lora), a list, its
# items. Deeper YAML is refused before anything walks it (Python's recursion would end in a
# RecursionError around a few hundred levels).
MAX_DEPTH = 8


def _check_depth(value: Any, where: str) -> None:
    """A ConfigError naming ``where`` when ``value`` nests more than :data:`MAX_DEPTH` levels
    of mappings and lists (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise ConfigError(
                    f"{where}: nested more than {MAX_DEPTH} levels deep; a config is a mapping of "
                    "sections of keys and values"
                )
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def _safe_load(text: str, where: str) -> Any:
    """``yaml.safe_load``, with YAML nested too deep to compose (RecursionError) and YAML
    nested deeper than a config can mean both a ConfigError naming ``where``."""
    try:
        loaded = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(
            f"{where}: nested more than {MAX_DEPTH} levels deep; a config is a mapping of "
            "sections of keys and values"
        ) from None
    _check_depth(loaded, where)
    return loaded


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` (safe loader); a ConfigError naming the file and line when
    it is not UTF-8 text or not valid YAML (PyYAML's own message names ``<unicode string>``)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file "
            "as UTF-8"
        ) from None
    try:
        return _safe_load(text, str(path))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in the YAML recipe ``path`` (safe loader; an empty file is ``{}``),
    as written: not checked against the sections yet. A ConfigError when the file is missing,
    not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    loaded = _read_yaml(path)
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of ``raw`` with each parsed override (:func:`parse_override`) set at its dotted
    key, in order: a later one wins, and one that sets a whole section (``model.lora={r: 4}``)
    replaces that section's mapping. An override inside a section that is not a mapping
    (``lora: 8`` and ``model.lora.r=4``) is a ConfigError naming the section: the value would
    be lost. An empty section (YAML null) takes it. ``raw`` itself is left as it was."""
    raw = copy.deepcopy(raw)
    for key, value in overrides:
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                shown = str(value)[:40]
                raise ConfigError(
                    f"{section}: is {child!r:.40}, not a mapping, so the override "
                    f"{key}={shown} has no section to go into; write {section} as a mapping of "
                    "its keys (or set the whole section with one override)"
                )
            node = child
        node[parts[-1]] = value
    return raw


def build_config(raw: dict[str, Any]) -> RunConfig:
    """The RunConfig of a raw mapping (strict keys and types), before resolution
    (:func:`~opsd_mm.config.checks.resolve_config`)."""
    return _build(RunConfig, raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (safe loader), apply dotted overrides, validate into RunConfig."""
    raw = read_config_file(path) if path is not None else {}
    raw = apply_overrides(raw, [parse_override(item) for item in overrides or []])
    return resolve_config(build_config(raw))


# Keys whose values are secrets: written and logged as SECRET_MASK when set.
SECRET_KEYS = ("rollout.server_token",)
SECRET_MASK = "***"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as the nested dict that is written (``config.yaml``) and logged (tracker
    hyper-parameters): keys spelled as in YAML, secrets (``SECRET_KEYS``) masked, so a run
    directory or a dashboard never holds a bearer token."""
    d = _rename_keys(_plain(cfg))
    for key in SECRET_KEYS:
        *parents, last = key.split(".")
        node = d
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(last) is not None:
            node[last] = SECRET_MASK
    return d


def _plain(obj: Any) -> Any:
    """``dataclasses.asdict``, except that an item of a list (an operation of
    ``processor.student_view``) keeps only the fields it sets - those that differ from the
    field's default - so ``config.yaml`` shows ``{op: blur, radius: 1.5}`` rather than every
    option of every operation, mostly null. Loading it back gives the same config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_item(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def _item(obj: Any) -> Any:
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return _plain(obj)
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # required: always written
            out[f.name] = _plain(value)
            continue
        if value != default:
            out[f.name] = _plain(value)
    return out


def _rename_keys(d: dict[str, Any]) -> dict[str, Any]:
    return {
        _FIELD_TO_KEY.get(k, k): _rename_keys(v) if isinstance(v, dict) else v for k, v in d.items()
    }


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def leaves(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every non-mapping value in nested mappings, in order; an empty
    mapping (``teachers: {}``) is a value too."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(leaves(v, key + "."))
        else:
            out[key] = v
    return out


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """:func:`leaves` with every value a scalar a tracker accepts (others as their str)."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in leaves(d, prefix).items()
    }
