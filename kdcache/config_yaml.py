"""The one YAML reader of user files (pipeline recipes, ``kdcache train -c`` configurations).

It is PyYAML's safe loader (plain data only: a YAML file never builds Python objects) with two
changes that turn silent surprises into values or errors:

* a key given twice in one mapping is refused, naming the key path and both lines (PyYAML keeps
  the last one silently, so ``lr: 1e-3`` ... ``lr: 1e-2`` would train with a value the reader
  overlooked);
* numbers written without a dot (``1e-4``, ``5E3``) or with an unsigned exponent (``1.0e5``) are
  floats (YAML 1.2; PyYAML's YAML 1.1 rules read them as strings).

Every problem is a one-line :class:`~kdcache.errors.ConfigError` that names the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kdcache.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """Safe loader that also reads YAML 1.2 floats such as ``1e-4`` (see the module docstring)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _key_path(parents: tuple, key: str) -> str:
    out = ""
    for p in (*parents, key):
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _refuse_duplicates(node: yaml.Node, where: str, parents: tuple = (), seen: set | None = None) -> None:
    """Walk the composed document and raise on a mapping key given twice (before anything is
    constructed, so the key path is known)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (anchors may even be recursive)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *defaults`: keys given here override, by design
                _refuse_duplicates(value_node, where, parents, seen)
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if name is not None:
                ident = (key_node.tag, name)
                if ident in lines:
                    both = f"line {line}" if lines[ident] == line else f"lines {lines[ident]} and {line}"
                    raise ConfigError(f"{where}: key {_key_path(parents, name)!r} is given twice ({both}); keep one")
                lines[ident] = line
            _refuse_duplicates(value_node, where, (*parents, name if name is not None else "?"), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, where, (*parents, i), seen)


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's messages span several lines (with a drawing of the spot); keep line, column, problem."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f"{exc.context}, " if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {context}{exc.problem}"
    return " ".join(str(exc).split())


def loads_yaml(text: str, where: str) -> Any:
    """Parse YAML text (see the module docstring).

    Args:
        text: the YAML document.
        where: how errors name the source, e.g. ``"recipe pipelines/demo.yaml"``.

    Returns:
        The plain data (dicts, lists, strings, numbers, booleans, None); None for an empty document.

    Raises:
        ConfigError: invalid YAML, several documents, or a key given twice.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({_one_line(exc)})") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, what: str = "file") -> Any:
    """Read a YAML file with :func:`loads_yaml`.

    Args:
        path: the file.
        what: what the file is, for messages (``"recipe"``, ``"config file"``).

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, or a key given twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc})") from None
    return loads_yaml(text, f"{what} {path}")
