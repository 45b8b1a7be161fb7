"""The config reference (``opsd-mm config reference``, docs/config.md), generated from the code.

Each section's documentation is its class docstring in :mod:`opsd_mm.config.sections`; each
field's, the block of ``#`` comment lines directly above it (contiguous, ending on the line
before the field). Both are read from the source with :mod:`ast` and :mod:`tokenize`, so the
page cannot drift from the dataclasses: a test compares the checked-in page with
:func:`reference_markdown`, and another requires a comment on every field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from opsd_mm.config.load import _FIELD_TO_KEY
from opsd_mm.config.sections import RunConfig

# Comments that direct a tool rather than document a field.
_PRAGMA = re.compile(r"#\s*(fmt:|noqa\b|type:|pragma\b|ruff:)")


@dataclass(frozen=True)
class FieldDoc:
    """One row of the reference: a field under its dotted config key."""

    key: str  # dotted, as spelled in YAML and overrides (``rollout.async``)
    type: str  # readable, Markdown (``int``, ``float | null``, one of ``jsd``, ...)
    default: str  # as YAML writes it; "" for a section
    doc: str  # the comment block above the field, joined into one paragraph ("" if none)
    section: type | None = None  # the section class, for a field that is a whole section
    mapped: bool = False  # a mapping of named sections (``teachers``)


def config_key(name: str) -> str:
    """The YAML / override spelling of a dataclass field (``async_`` -> ``async``)."""
    return _FIELD_TO_KEY.get(name, name)


# The placeholder for a name in a mapping of sections (``teachers.NAME.kind``).
NAME = "NAME"


def mapped_section(tp: Any) -> type | None:
    """The section class of a mapping of named sections (``dict[str, TeacherSpec]``), else
    None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]
    return None


def config_sections(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """``(dotted prefix, section class)`` of ``cls`` and of every section below it, depth
    first in field order: ``("", RunConfig), ("model", ModelConfig), ("model.lora", ...)``; a
    mapping of named sections under ``NAME`` (``("teachers.NAME", TeacherSpec)``)."""
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}.{config_key(f.name)}".lstrip(".")
        if dataclasses.is_dataclass(tp):
            out += config_sections(tp, key)
        elif mapped_section(tp) is not None:
            out += config_sections(mapped_section(tp), f"{key}.{NAME}")
    return out


def item_sections(cls: type = RunConfig, prefix: str = "") -> list[tuple[list[str], type]]:
    """The dataclasses that list-valued keys hold (``processor.student_view`` and
    ``processor.teacher_view`` hold view operations): ``([keys holding it], item class)``, each
    class once, in field order. They are documented after the sections, one table each."""
    found: dict[type, list[str]] = {}
    for section_prefix, section in config_sections(cls, prefix):
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            tp = hints[f.name]
            if typing.get_origin(tp) in (typing.Union, types.UnionType):  # list[...] | None
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            args = typing.get_args(tp)
            if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
                key = f"{section_prefix}.{config_key(f.name)}".lstrip(".")
                found.setdefault(args[0], []).append(key)
    return [(keys, item) for item, keys in found.items()]


def _class_node(cls: type) -> tuple[ast.ClassDef, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef), cls
    return node, source


def section_doc(cls: type) -> str:
    """The class docstring of a section as one paragraph ("" if none; not the signature that
    ``dataclass`` puts in ``__doc__`` when there is none)."""
    node, _ = _class_node(cls)
    return " ".join((ast.get_docstring(node) or "").split())


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the contiguous block of comment-only lines directly above the field's first
    line, joined into one paragraph (a blank line or code ends the block; tool pragmas such as
    ``# fmt: skip`` do not count). Fields without such a block are absent."""
    node, source = _class_node(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number -> text, for lines holding only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT or _PRAGMA.match(tok.string):
            continue
        row = tok.start[0]
        if lines[row - 1].lstrip().startswith("#"):
            comments[row] = tok.string[1:].strip()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if stmt.target.id not in names:
            continue
        block: list[str] = []
        row = stmt.lineno - 1
        while row in comments:
            block.insert(0, comments[row])
            row -= 1
        text = " ".join(" ".join(block).split())
        if text:
            out[stmt.target.id] = text
    return out


def yaml_value(value: Any) -> str:
    """``value`` as YAML writes it on one line (``null``, ``true``, ``0.0002``, ``[a, b]``)."""
    text = yaml.safe_dump(
        value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False
    ).strip()
    if text.endswith("\n..."):  # the document end marker YAML adds after a lone scalar
        text = text[: -len("\n...")].rstrip()
    return text


def type_text(tp: Any) -> str:
    """A readable type in Markdown: ``int``, ``float | null``, one of ``jsd``, ``forward_kl``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = type_text(rest[0]) if len(rest) == 1 else " or ".join(map(type_text, rest))
        if type(None) not in args:
            return inner
        if inner.startswith("one of "):
            return f"{inner}, or `null`"
        return f"{inner[:-1]} | null`" if inner.endswith("`") else f"{inner} or `null`"
    if origin is Literal:
        return "one of " + ", ".join(f"`{yaml_value(a)}`" for a in args)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return f"`list[{getattr(item, '__name__', str(item))}]`"
    if origin is dict:
        return f"mapping of `str` to {type_text(args[1]) if len(args) == 2 else 'any'}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return f"`{getattr(tp, '__name__', str(tp).replace('typing.', ''))}`"


def field_docs(cls: type, prefix: str = "") -> list[FieldDoc]:
    """The rows of one section, in field order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}.{config_key(f.name)}".lstrip(".")
        if dataclasses.is_dataclass(tp):
            rows.append(FieldDoc(key, type_text(tp), "", comments.get(f.name, ""), section=tp))
            continue
        if f.default_factory is not dataclasses.MISSING:
            default = yaml_value(f.default_factory())
        elif f.default is dataclasses.MISSING:
            default = ""  # a required key (a view operation's ``op``)
        else:
            default = yaml_value(f.default)
        rows.append(
            FieldDoc(
                key,
                type_text(tp),
                default,
                comments.get(f.name, ""),
                mapped=mapped_section(tp) is not None,
            )
        )
    return rows


def all_field_docs() -> list[FieldDoc]:
    """Every field of every section, the sections' own fields included."""
    return [row for prefix, cls in config_sections() for row in field_docs(cls, prefix)]


# ----------------------------------------------------------------------------- Markdown

_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _md(text: str) -> str:
    """Prose for a table cell: the source's ````x```` code spans as ```x```, ``|`` escaped
    everywhere (GitHub tables split on it, even in code spans), ``<`` and ``*`` escaped outside
    code spans (no HTML tags, no emphasis)."""
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(re.sub(r"([<*])", r"\\\1", text[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(re.sub(r"([<*])", r"\\\1", text[pos:]))
    return "".join(out).replace("|", r"\|")


def _anchor(prefix: str) -> str:
    """The heading anchor GitHub gives ``## `prefix` `` (the top level: ``## Top level``)."""
    return prefix.replace(".", "").lower() if prefix else "top-level"


def _link(prefix: str) -> str:
    return f"[`{prefix}`](#{_anchor(prefix)})"


_INTRO = """\
# Configuration reference

<!-- Generated from opsd_mm/config/sections.py by `opsd-mm config reference --output \
docs/config.md` (make config-reference). Do not edit: edit the comments above the fields. -->

A run is configured by one YAML file (see `configs/`): a mapping of sections (`model`, `data`,
...), each a mapping of the keys below, plus the top-level `run_dir` and `seed`. A key left out
takes its default.

```yaml
model:
  name_or_path: Qwen/Qwen3-1.7B
  lora: {r: 32, alpha: 64}
rollout:
  n: 4
  temperature: 1.1
trainer:
  lr: 1.0e-5
run_dir: runs/qwen3
```

On the command line, dotted `key=value` overrides follow the file and win over it:

```
opsd-mm train configs/tiny_text.yaml trainer.max_steps=3 loss.beta=0.1 model.lora.r=8
```

An override's value is read as YAML (`3`, `1e-4`, `true`, `[tensorboard, wandb]`), except that
a key of type `str` takes the text as written. `null` (in the file, or as an override such as
`loss.pointwise_clip=null`) unsets a key whose type allows it; its row says what null means. An
unknown key or a value of the wrong type is an error naming the key. `rollout.async` is spelled
so in YAML and overrides (the dataclass field is `async_`).

Some values are filled in when the config loads: `loss.temperature` from `rollout.temperature`,
and a `data.preset`'s `data.split` and `processor.teacher_template`. `opsd-mm config show CONFIG
[key=value ...]` prints the config as training uses it, each value with its origin (`default`,
`file`, `override` or `resolved`); a run writes the same values to `RUN_DIR/config.yaml`.
"""


def reference_markdown() -> str:
    """The whole reference page: the intro, then per section its docstring and a table of its
    keys (key | type | default | meaning)."""
    sections = config_sections()
    parts = [_INTRO]
    toc = [f"- [Top level](#{_anchor('')})"]
    for prefix, _ in sections[1:]:
        toc.append("  " * prefix.count(".") + f"- {_link(prefix)}")
    for keys, _ in item_sections():
        title = "Items of " + " / ".join(f"`{k}[]`" for k in keys)
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")  # GitHub's rule
        toc.append(f"- [{title}](#{anchor})")
    parts.append("Sections:\n\n" + "\n".join(toc) + "\n")
    for prefix, cls in sections:
        depth = 2 + prefix.count(".")
        title = f"`{prefix}`" if prefix else "Top level"
        lines = [f"{'#' * depth} {title}", ""]
        doc = section_doc(cls)
        if doc:
            lines += [_md(doc), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in field_docs(cls, prefix):
            if row.section is not None:
                kind, default = f"section, see {_link(row.key)}", ""
            elif row.mapped:
                kind = f"mapping of names to sections, see {_link(f'{row.key}.{NAME}')}"
                default = f"`{row.default}`"
            else:
                kind, default = row.type, f"`{row.default}`"
            cells = [f"`{row.key}`", kind, default, row.doc]
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
        parts.append("\n".join(lines) + "\n")
    for keys, item in item_sections():
        title = "Items of " + " / ".join(f"`{k}[]`" for k in keys)
        lines = [f"## {title}", "", _md(section_doc(item)), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in field_docs(item):
            default = "required" if row.default == "" else f"`{row.default}`"
            cells = [f"`{row.key}`", row.type, default, row.doc]
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
