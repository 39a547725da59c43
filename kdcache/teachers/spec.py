"""The one syntax of a teacher that is code to import: ``PREFIX:MODULE:ATTRIBUTE[:JSON-KWARGS]``.

``ase:MODULE:FACTORY`` (an ASE calculator, :mod:`kdcache.teachers.calculator`) and
``py:MODULE:FUNCTION`` (a torch module, :mod:`kdcache.teachers.adapter`) are written, parsed,
imported and called the same way; only what the call must give differs. Both import and run the
code they name, which is why such a spec is taken only from the command line or as a Python
object, never from a string setting (see :func:`kdcache.store.extract.resolve_teacher`).

Imports nothing heavy: a calculator's worker process imports this module.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from typing import Any

from kdcache.errors import ConfigError

#: a module path or an attribute path: dotted Python identifiers
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class CodeSyntax:
    """How one kind of code teacher is written.

    Args:
        prefix: what the spec starts with (``ase:``).
        kind: what the teacher is called in messages (``calculator teacher``).
        form: the spec's form with an example, for messages.
        example_kwargs: an example of keyword arguments, for messages.
    """

    prefix: str
    kind: str
    form: str
    example_kwargs: str

    def matches(self, text: Any) -> bool:
        """Whether a ``--teacher`` value is a spec of this kind (a string starting with the prefix)."""
        return isinstance(text, str) and text.strip().lower().startswith(self.prefix)

    def split(self, text: str, option: str = "--teacher") -> tuple[str, str, dict]:
        """``PREFIX:MODULE:ATTRIBUTE[:JSON-KWARGS]`` as ``(module, attribute, kwargs)``; the JSON may
        itself hold colons.

        Args:
            text: the spec.
            option: the option it was given to, for messages.

        Raises:
            ConfigError: not of that form, or keyword arguments that are not a JSON object.
        """
        if not self.matches(text):
            raise ConfigError(f"{option} {text!r}: a {self.kind} is written {self.form}")
        module, _, rest = text.strip()[len(self.prefix):].partition(":")
        attribute, _, raw = rest.partition(":")
        if not _DOTTED.match(module) or not _DOTTED.match(attribute):
            raise ConfigError(f"{option} {text!r}: expected {self.form}")
        kwargs: Any = {}
        if raw.strip():
            try:
                kwargs = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{option} {text!r}: the keyword arguments are not JSON "
                                  f"({exc.msg} at character {exc.pos} of {raw!r})") from None
            if not isinstance(kwargs, dict):
                raise ConfigError(f"{option} {text!r}: the keyword arguments must be a JSON object, "
                                  f"e.g. {self.example_kwargs}; got {raw!r}")
        return module, attribute, kwargs

    def call(self, name: str, module: str, attribute: str, kwargs: dict):
        """Import ``module`` and call its ``attribute(**kwargs)`` (this runs their code).

        Args:
            name: the teacher's name, for messages (``ase:MODULE:FACTORY``).
            module, attribute, kwargs: from :meth:`split`.

        Raises:
            ConfigError: the module does not import, has no such attribute, the attribute is not
                callable, or the call fails.
        """
        label = f"{self.kind} {name}"
        try:
            obj = importlib.import_module(module)
        except Exception as exc:  # ImportError, or whatever the module's own code raises
            missing = isinstance(exc, ModuleNotFoundError) and module.startswith(str(exc.name))
            # a console script does not search the current folder, as `python -m` would
            hint = "; a module of your own must be on the Python path, e.g. PYTHONPATH=. kdcache ..." if missing else ""
            raise ConfigError(f"{label}: cannot import {module!r} ({type(exc).__name__}: {exc}){hint}") from None
        for part in attribute.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"{label}: {module} has no {attribute!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise ConfigError(f"{label}: {module}.{attribute} is not callable")
        try:
            return obj(**kwargs)
        except Exception as exc:
            raise ConfigError(f"{label}: {attribute}(**{json.dumps(kwargs)}) failed "
                              f"({type(exc).__name__}: {exc})") from None
