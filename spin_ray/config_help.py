"""The list of config keys that ``--help`` prints, generated from the config dataclasses.

Each key's type and default come from :func:`dataclasses.fields`, its one-line doc from the
string literal that follows the field in the class source (read with :mod:`ast`), so the help
cannot drift from :mod:`spin_ray.config` (and :class:`spin_ray.sweep.SweepConfig`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import yaml

from spin_ray.config import Config

DOC_INDENT = " " * 6
HELP_WIDTH = 100
HEADER = ("config keys: set any with key=value on the command line or nested in the --config YAML. "
          "Shown with the built-in defaults; a config file overrides them (--print-config shows the "
          "resolved values). Full docs: spin_ray/config.py.")


@dataclasses.dataclass(frozen=True)
class KeyHelp:
    """One config key as ``--help`` shows it."""

    key: str
    """Dotted key, e.g. ``train.lr``."""
    type: str
    """The annotation, written as in the YAML (``float | list[float]``, ``'spin' | 'sft'``)."""
    default: str
    """The default as a YAML value."""
    doc: str
    """The first sentence of the field's docstring, in plain text."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring after that field in ``cls``'s source (empty without source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: types and defaults still hold
        return {}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs = {}
    for statement, following in zip(node.body, node.body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def sections(root: type = Config, prefix: str = "") -> Iterator[tuple[str, type, list[KeyHelp]]]:
    """(section key, its class, its keys) for ``root``'s own keys (section key ``prefix``,
    empty at the top) and then each nested section, depth first."""
    hints = typing.get_type_hints(root)
    own, nested = [], []
    for f in dataclasses.fields(root):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((key, hints[f.name]))
        else:
            own.append(KeyHelp(key, type_label(hints[f.name]), yaml_value(_default(f)),
                               one_line(field_docs(root).get(f.name, ""))))
    if own or prefix:  # a section of sections only (``baselines``) still gets its heading
        yield prefix, root, own
    for key, cls in nested:
        yield from sections(cls, key)


def keys_help(extra: Mapping[str, type] | None = None, width: int = HELP_WIDTH) -> str:
    """The ``--help`` epilog: every key of :class:`Config` (and of the ``extra`` sections, name
    -> dataclass, e.g. ``sweep``), grouped by section, with type, default and doc."""
    lines = [*textwrap.wrap(HEADER, width), ""]
    groups = list(sections())
    for name, cls in (extra or {}).items():
        groups.extend(sections(cls, name))
    for prefix, cls, keys in groups:
        title = one_line(inspect.cleandoc(cls.__doc__ or ""))
        lines.append(f"{prefix or 'top level'}: {title}")
        for item in keys:
            lines.append(f"  {item.key}: {item.type} = {item.default}")
            if item.doc:
                lines.extend(textwrap.wrap(item.doc, width, initial_indent=DOC_INDENT, subsequent_indent=DOC_INDENT))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def type_label(tp: Any) -> str:
    """An annotation as a user reads it: ``str | null``, ``'spin' | 'sft'``, ``list[float]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_label(option) for option in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(value) for value in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_label(arg) for arg in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML (what a user would type after ``key=``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)\.\s+(?=[A-Z])")


def one_line(doc: str) -> str:
    """The first sentence of a docstring, without reStructuredText markup."""
    text = _ROLE.sub(r"\1", doc).replace("``/``", " or ").replace("``", "")
    text = " ".join(text.split())
    for end in _SENTENCE_END.finditer(text):
        head = text[:end.start() + 1]
        if head.count("(") == head.count(")"):  # "(eq. C.5)" does not end a sentence
            return head
    return text


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
