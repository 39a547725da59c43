"""The one way kdcache checks user settings: pydantic v2 schemas that report errors by key path.

A settings schema (``kdcache train``'s :class:`~kdcache.train.config.TrainConfig`, a pipeline
recipe, :mod:`kdcache.pipeline.recipe`) is a :class:`Schema`: an unknown key is refused, types are
strict (``true`` is no number, ``"8"`` no int) with the few conversions YAML files and hand-made
mappings need (:func:`integer`, :func:`number`, :func:`text_list`), numbers are finite and within
their bounds, and :func:`choice` names the allowed values. A refused value becomes ONE
:class:`~kdcache.errors.ConfigError` that names where the value came from and its key path
(:func:`validated`), e.g. ``recipe r.yaml: key 'students.train.lr': must be > 0, got -1``.

The command line derives its options from the same fields (:func:`command_line_options`): the
help is the field's description, the type its annotation, the allowed values its choices.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Mapping

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError,
                      ValidationInfo, WrapValidator, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUndefined

from kdcache.errors import ConfigError

#: error type of a schema's own refusal (:func:`refuse`)
_REFUSED = "kdcache_refused"
#: what a wrong type is called in a message, by the prefix of pydantic's error type
_EXPECTED = {"int": "int", "float": "int or float", "bool": "true or false", "string": "str", "list": "a list",
             "tuple": "a list", "dict": "a mapping", "model": "a mapping"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def refuse(key: str, message: str) -> PydanticCustomError:
    """A refusal by a schema's own rule: raise it in a validator.

    Args:
        key: the key path below the validated object that is wrong (``""``: the object itself;
            ``"overrides"``, ``"terms.k2k"``).
        message: what is wrong, as the user reads it after ``key '...':``.
    """
    return PydanticCustomError(_REFUSED, "{message}", {"message": message, "key": key})


# --- value types -------------------------------------------------------------------------------
def _float_from_text(value: Any) -> Any:
    if isinstance(value, str):  # PyYAML (YAML 1.1) and hand-made mappings give `1e-4` as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _int_from_whole_float(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # `max_steps: 1e4`


def _list_from_text(value: Any) -> Any:
    if isinstance(value, str):  # `augment: rotate`, `features: node,e2n`
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def integer(**bounds: float) -> Any:
    """An int (a whole float such as ``1e4`` too; never a bool or a string) within ``bounds``
    (pydantic's ``gt``/``ge``/``lt``/``le``)."""
    return Annotated[int, BeforeValidator(_int_from_whole_float), Field(strict=True, **bounds)]


def number(**bounds: float) -> Any:
    """A finite float (an int or a numeric string such as ``"1e-4"`` too; never a bool) within ``bounds``."""
    return Annotated[float, BeforeValidator(_float_from_text), Field(strict=True, allow_inf_nan=False, **bounds)]


def choice(values: tuple[str, ...]) -> Any:
    """One of ``values`` (a ``Literal``: the command line lists them in its help)."""

    def check(value: Any) -> Any:
        if not isinstance(value, str):
            raise refuse("", f"expected str, got {value!r}")
        if value not in values:
            raise refuse("", f"{value!r} is not one of {list(values)}")
        return value

    return Annotated[Literal[values], BeforeValidator(check)]


def switch_or_auto() -> Any:
    """``true``, ``false`` or ``"auto"`` (the program decides, and says what). A command line
    gives ``--x``/``--no-x``; leaving both out leaves the file's value or ``auto``."""

    def check(value: Any) -> Any:
        if value is True or value is False or value == "auto":
            return value
        raise refuse("", f"expected true, false or 'auto', got {value!r}")

    return Annotated[bool | Literal["auto"], PlainValidator(check)]


def is_switch_or_auto(annotation: Any) -> bool:
    """Whether a field's annotation is :func:`switch_or_auto` (with or without its validator)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) == {
        bool, Literal["auto"]}


def text_list(item: Any) -> Any:
    """A list of ``item`` (a comma-separated string too: ``augment: rotate``)."""
    return Annotated[list[item], BeforeValidator(_list_from_text)]


def one_or_list(item: Any) -> Any:
    """A list of ``item``; one ``item`` on its own is a list of one (``seeds: 0``, ``lambda: 3``),
    checked at the key itself."""
    one = TypeAdapter(item)

    def check(value: Any, handler: Callable) -> Any:
        return handler(value) if isinstance(value, list) else [one.validate_python(value)]

    return Annotated[list[item], WrapValidator(check)]


def _empty_if_none(value: Any) -> Any:
    return {} if value is None else value


#: a free-form mapping (its contents are checked elsewhere); YAML's empty ``key:`` is ``{}``
ANY_MAPPING = Annotated[dict, BeforeValidator(_empty_if_none)]


def section_dict(schema: type[BaseModel]) -> Any:
    """A mapping checked by ``schema`` and kept as a plain dict of all its settings (defaults
    filled in), for code that reads it as ``section["key"]``."""

    def check(value: Any, info: ValidationInfo) -> dict:
        return schema.model_validate(value, context=info.context).model_dump()

    return Annotated[dict, PlainValidator(check)]


class Schema(BaseModel):
    """Base of every settings schema: strict types, unknown keys refused (see the module docstring).

    A key may be given by its field name or its alias (``lambda`` for ``lambda_``); ``None`` for a
    whole section means "all defaults" (YAML ``section:`` with nothing under it).
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_by_name=True, validate_by_alias=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, values: Any) -> Any:
        if values is None:
            return {}
        if isinstance(values, Mapping):
            known = cls.setting_keys()
            for key in values:
                if key not in known and key not in cls.model_fields:
                    raise refuse(str(key), cls.unknown_key_message(known))
        return values

    @classmethod
    def setting_keys(cls) -> list[str]:
        """The keys a user writes (aliases where a field has one, e.g. ``lambda``)."""
        return [f.alias or name for name, f in cls.model_fields.items()]

    @classmethod
    def unknown_key_message(cls, known: list[str]) -> str:
        return f"unknown key; allowed: {sorted(known)}"


# --- errors ----------------------------------------------------------------------------------
def key_path(loc: tuple, below: str = "") -> str:
    """``("strategies", 1, "lambda")`` -> ``strategies[1].lambda``; ``below`` is appended."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if below:
        path += below if below.startswith("[") or not path else f".{below}"
    return path


def _message(error: dict) -> str:
    kind, got = error["type"], error.get("input")
    if kind == _REFUSED:
        return error["ctx"]["message"]
    if kind == "missing":
        return "is required"
    if kind == "finite_number" or (kind in _BOUNDS and isinstance(got, float) and not math.isfinite(got)):
        return f"must be finite, got {got!r}"  # (pydantic checks the bounds of nan first)
    if kind in _BOUNDS:
        (bound,) = error["ctx"].values()
        return f"must be {_BOUNDS[kind]} {bound:g}, got {got!r}"
    for prefix, name in _EXPECTED.items():
        if kind.startswith(prefix + "_"):
            return f"expected {name}, got {got!r}"
    return error["msg"]


def config_error(exc: ValidationError, where: Callable[[str], str]) -> ConfigError:
    """The first problem of a pydantic error as ``"<where(key path)>: <what is wrong>"``."""
    error = exc.errors(include_url=False)[0]
    below = (error.get("ctx") or {}).get("key", "") if error["type"] == _REFUSED else ""
    return ConfigError(f"{where(key_path(error['loc'], below))}: {_message(error)}")


def validated(schema: type[BaseModel], values: Any, where: Callable[[str], str], context: dict | None = None):
    """``schema.model_validate(values)``, its first problem raised as a :class:`ConfigError`.

    Args:
        schema: the model class.
        values: the mapping to check.
        where: how a message names a key path, e.g. ``lr -> "config file run.yaml: key 'lr'"``.
        context: handed to the validators (e.g. the recipe file, strict environment expansion).
    """
    try:
        return schema.model_validate(values, context=context)
    except ValidationError as exc:
        raise config_error(exc, where) from None


# --- the command line --------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionSpec:
    """A command-line option derived from one schema field.

    Args:
        name: the field (the Python parameter).
        flag: the option without dashes (``batch-size``, ``lambda``).
        type: int, float, str or bool (a bool is a ``--x/--no-x`` switch).
        help: the field's description, its allowed values and default.
        choices: allowed values (empty: any).
        toggle: for a list of choices, the one choice this switch adds or removes (``--rotate``).
    """

    name: str
    flag: str
    type: type
    help: str
    choices: tuple[str, ...] = ()
    toggle: str | None = None


def _plain(text: str) -> str:
    """Field descriptions are reStructuredText; the command line shows plain words."""
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).split(".")[-1], text)
    return re.sub(r"\s+", " ", text.replace("``", "")).strip()


def _members(annotation: Any) -> list:
    """The types an annotation allows besides None, without their ``Annotated`` constraints."""
    members = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return [typing.get_args(m)[0] if typing.get_origin(m) is Annotated else m for m in members]


def field_help(info: FieldInfo) -> str:
    """A field's description as plain text, with its allowed values and default."""
    text = _plain(info.description or "")
    choices = option_choices(info.annotation)
    if choices:
        text += f" One of: {', '.join(choices)}."
    default = info.default
    if default is not None and default is not PydanticUndefined and not isinstance(default, (list, dict)):
        text += f" (default: {_shown(default)})"
    return text


def _shown(value: Any) -> str:
    """A default as a user writes it (``true``, ``5e-4``)."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_choices(annotation: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` (or optional ``Literal``) annotation; ``()`` for anything else."""
    (member, *_) = _members(annotation)
    return typing.get_args(member) if typing.get_origin(member) is Literal else ()


def command_line_options(schema: type[BaseModel]) -> list[OptionSpec]:
    """One option per field a command line can give (named by its alias, ``--lambda``): a number,
    a string, a switch, a choice, or one switch per choice of a list of choices (``--rotate``).
    Mappings and other lists are left to files.

    Args:
        schema: the settings model.
    """
    options = []
    for name, info in schema.model_fields.items():
        flag = (info.alias or name).replace("_", "-")
        member, choices = _members(info.annotation)[0], option_choices(info.annotation)
        if is_switch_or_auto(member):  # `--fast/--no-fast`; neither: auto
            options.append(OptionSpec(name, flag, bool, field_help(info)))
        elif choices or member is Any:  # a free-form setting (the strategy) is text on a command line
            options.append(OptionSpec(name, flag, str, field_help(info), choices))
        elif member in (int, float, str, bool):
            options.append(OptionSpec(name, flag, member, field_help(info)))
        elif typing.get_origin(member) is list:
            for value in option_choices(typing.get_args(member)[0]):
                options.append(OptionSpec(name, value, bool, f"Add {value} to {flag} (--no-{value}: remove it). "
                                          f"{field_help(info)}", toggle=value))
    return options
