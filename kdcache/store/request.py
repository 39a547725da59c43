"""What one extraction is asked to do: the one schema of every ``kdcache extract`` setting.

:class:`ExtractRequest` holds every setting, with its type, allowed values, default and help;
``kdcache extract``'s options, :func:`kdcache.store.extract.extract` and the check of a recipe's
``store.options`` (:func:`check_settings`) all derive from it. The settings that decide the stored values become a
:class:`StoreRecord` (:meth:`ExtractRequest.store_record`), kept in the store as its ``request``
attribute: a resume must present the same record, and the writer names any setting that differs.

This module imports no model and runs no teacher (of :mod:`kdcache.teachers.calculator` it uses
the spec class only): checking settings costs nothing.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Sequence, Union

from pydantic import BeforeValidator, ConfigDict, Field, InstanceOf, ValidationError, ValidationInfo, model_validator

from kdcache.errors import ConfigError
from kdcache.settings import Schema, choice, config_error, integer, is_switch_or_auto, refuse, switch_or_auto
from kdcache.store import format as F
from kdcache.teachers.adapter import AdapterSpec
from kdcache.teachers.calculator import CalculatorSpec
from kdcache.teachers.hooks import parse_feature_modules

#: the precisions a teacher model runs in (``--teacher-dtype``)
TEACHER_DTYPES = ("float32", "float64")

FeatureName = Literal[F.FEATURE_CHOICES]
_POSITIVE = integer(gt=0)


def _path_text(value: Any) -> Any:
    """A path given as ``os.PathLike`` as its text (checkpoints are recorded as text)."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _feature_list(value: Any) -> Any:
    """``"node, e2v"`` or ``["node", " e2v", ""]`` as ``("node", "e2v")`` (blanks dropped)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        return value  # not a list: the type check names it
    return tuple(f.strip() for f in items if not isinstance(f, str) or f.strip())


def _feature_modules(value: Any) -> Any:
    """``["node=interactions.2"]`` (repeated ``--feature``) or a mapping as ``{key: path}``."""
    try:
        return parse_feature_modules(value) or None
    except ValueError as exc:
        raise refuse("", str(exc)) from None


class ExtractRequest(Schema):
    """Every setting of one extraction (``kdcache extract``); see :mod:`kdcache.store.request`.

    Build it with :meth:`of`, which reports a bad value as a :class:`ConfigError` naming the
    option (``--shard-atoms: must be positive, got 0``).
    """

    model_config = ConfigDict(frozen=True)

    data: Path = Field(strict=False, description="Dataset: an .lmdb file, a folder of .lmdb files, or an ASE/xyz file.")
    out: Path = Field(strict=False, description="The store to write (a folder, e.g. teacher.zarr).")
    teacher: Union[str, InstanceOf[CalculatorSpec], InstanceOf[AdapterSpec], None] = Field(None, description=(
        "Preset name (gemnet-oc, painn-big, schnet, *-tiny ...). Optional with a checkpoint, whose own model "
        "configuration always wins. Without --checkpoint: randomly initialised (demo only). Or any ASE "
        "calculator, ase:MODULE:FACTORY[:JSON-KWARGS], e.g. ase:ase.calculators.emt:EMT or "
        "'ase:tblite.ase:TBLite:{\"method\": \"GFN2-xTB\"}': it stores energies, forces and, where the calculator "
        "gives them, per-atom energies. Or any torch module, py:MODULE:FUNCTION[:JSON-KWARGS], where FUNCTION "
        "returns a module with the adapter contract (docs/adapter-teachers.md). Both import MODULE and run its code."))
    checkpoint: Annotated[Optional[str], BeforeValidator(_path_text)] = Field(
        None, description="Teacher checkpoint (Open Catalyst or kdcache); its configuration wins over the preset's.")
    features: Annotated[Optional[tuple[FeatureName, ...]], BeforeValidator(_feature_list)] = Field(
        None, description="Comma list of what to store (default: all the teacher has; outputs = energy and forces).")
    dtype: choice(F.FEATURE_DTYPES) = Field("float16", description="Hidden-feature dtype.")
    label_dtype: choice(F.LABEL_DTYPES) = Field("float32", description="Dtype of energies, per-atom energies and forces.")
    codec: choice(F.CODECS) = Field("none", description="Compression of the shards (none: fastest reads, memory-mapped).")
    batch_size: _POSITIVE = Field(16, description=(
        "Samples per teacher forward; batches decide the values, so a resume must keep it. Not used by a "
        "calculator teacher, which computes each structure on its own."))
    device: Optional[str] = Field(None, description="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when CUDA "
                                  "exists).")
    limit: Optional[_POSITIVE] = Field(None, description="Only the first N samples.")
    shard_atoms: _POSITIVE = Field(F.DEFAULT_SHARD_ATOMS, description="Atoms per shard file.")
    chunk_atoms: _POSITIVE = Field(F.DEFAULT_CHUNK_ATOMS, description="Atoms per inner chunk (divides --shard-atoms).")
    overwrite: bool = Field(False, description=(
        "Replace an existing store made with other settings instead of resuming it (only a store: any other "
        "existing folder or file is refused, never deleted)."))
    seed: int = Field(0, description="Initialisation seed of a teacher without checkpoint.")
    progress: bool = Field(True, description="Show a progress bar (rank 0).")
    teacher_dtype: choice(TEACHER_DTYPES) = Field("float32", description="Precision the teacher model runs in (float64 for "
                                        "parity checks).")
    workers: _POSITIVE = Field(1, description=(
        "Processes an ASE calculator teacher runs in; a resume may change it (the values do not depend on it)."))
    hessian_probes: integer(ge=0) = Field(0, description=(
        "Also store K Hessian-vector products per structure (hvp [N, 3, K], in --dtype: -dF/dpos times K random "
        "probes regenerated from the sample index, for the hessian strategy; a model teacher only). Costs a double "
        "backward per probe."))
    fast: switch_or_auto() = Field("auto", description=(
        "Run a built-in model teacher on its compiled path (kdcache.models.fast: torch.compile; the same values to "
        "float32 round-off, GemNet-OC inference 1.35-1.56x on 1-2 CPU threads; the first batch compiles, warm from "
        "the on-disk cache). auto (the default, no switch given): compiled when the job's eager time, estimated "
        "from one timed batch, would save more than a cold compile (on the CPU; kdcache.models.fast_auto), and "
        "says so. Decides the values, so the store records it and a resume keeps it. Not with --hessian-probes "
        "or --feature."))
    feature_modules: Annotated[Optional[dict[str, str]], BeforeValidator(_feature_modules)] = Field(
        None, description=(
            "KEY=MODULE.PATH, repeatable: store the output of the teacher's submodule at that path (a forward "
            "hook; model.get_submodule(PATH)) as hidden feature KEY, whatever --features says, e.g. "
            "node=interactions.2, or vector=update_layers.1[1] ([i]: element i of a tuple output). node and e2n "
            "need an output [atoms, d] (n2n reads node), vector and e2v [atoms, 3, d] (v2v reads vector). For "
            "built-in and py: teachers."))

    @model_validator(mode="before")
    @classmethod
    def _named_values(cls, values: Any, info: ValidationInfo) -> Any:
        # before pydantic's own checks: the rules' messages name the option and say what to do
        if isinstance(values, Mapping):
            check_settings(values, (info.context or {}).get("name", option_name))
        return values

    @classmethod
    def of(cls, **settings: Any) -> "ExtractRequest":
        """The request for ``settings`` (field name -> value).

        Args:
            **settings: any of the fields; ``data`` and ``out`` are required.

        Raises:
            ConfigError: an unknown setting or a value of the wrong type or out of range,
                naming the option (``--batch-size: ...``).
        """
        try:
            return cls(**settings)
        except ValidationError as exc:
            raise config_error(exc, lambda key: option_name(key.split(".")[0].split("[")[0]) if key else "extract") from None

    @classmethod
    def check_options(cls, options: Mapping[str, Any], where: Callable[[str], str]) -> None:
        """Check settings given apart from ``data`` and ``out`` (a recipe's ``store.options``):
        known names, their types, their values and the rules between them.

        Args:
            options: setting -> value.
            where: how a message names a setting, ``name -> text``.

        Raises:
            ConfigError: ``"<where(setting)>: <what is wrong>"``.
        """
        try:
            cls.model_validate({"data": ".", "out": ".", **options}, context={"name": where})
        except ValidationError as exc:
            raise config_error(exc, where) from None

    def num_samples(self, available: int) -> int:
        """Samples to store out of the ``available`` ones (``limit``)."""
        return available if self.limit is None else min(self.limit, available)

    def dtypes(self, keys: Sequence[str]) -> dict[str, str]:
        """Logical dtype of each stored key (``keys`` per atom, plus ``energy``)."""
        out = {k: (self.dtype if k in F.FEATURE_DTYPE_KEYS else self.label_dtype) for k in keys}
        out["energy"] = self.label_dtype
        return out

    def store_record(self, teacher: Mapping, dataset: Mapping, num_samples: int, keys: Sequence[str],
                     has_energy: bool, value_settings: Sequence[str]) -> "StoreRecord":
        """The record of what decides this store's values.

        Args:
            teacher: the teacher's identity (from ``teacher``, ``checkpoint`` and ``seed``).
            dataset: the dataset's fingerprint (from ``data``).
            num_samples: samples stored (from ``limit``).
            keys: per-atom keys stored (from ``features``).
            has_energy: energies and forces stored (``outputs``).
            value_settings: the further settings of this request that decide the runner's
                values (a model teacher's ``batch_size`` and ``teacher_dtype``, ``hessian_probes``
                when it stores products and ``fast`` when it runs compiled; none for a calculator).
        """
        own = {k: getattr(self, k) for k in ("codec", "shard_atoms", "chunk_atoms", *value_settings)}
        return StoreRecord(teacher=dict(teacher), dataset=dict(dataset), num_samples=num_samples, features=list(keys),
                           outputs=bool(has_energy), dtypes=self.dtypes(keys), **own)


class StoreRecord(Schema):
    """What decides a store's values, resolved from an :class:`ExtractRequest` (the store's
    ``request`` attribute). Every other setting (``out``, ``device``, ``overwrite``,
    ``progress``, ``workers``) may change between a run and its resume."""

    model_config = ConfigDict(frozen=True)

    teacher: dict = Field(description="The teacher's identity: name, configuration, weights (or seed).")
    dataset: dict = Field(description="The dataset's cheap fingerprint: kind, files, sizes, sample count.")
    num_samples: int = Field(ge=0, description="Samples stored (the first ones of the dataset).")
    features: list[str] = Field(description="Per-atom keys stored.")
    outputs: bool = Field(description="Energies and forces stored.")
    dtypes: dict[str, str] = Field(description="Logical dtype of each stored key.")
    codec: choice(F.CODECS)
    shard_atoms: _POSITIVE
    chunk_atoms: _POSITIVE
    batch_size: Optional[_POSITIVE] = Field(None, description="A model teacher's batches (they decide the sums).")
    teacher_dtype: Optional[choice(TEACHER_DTYPES)] = Field(None, description="A model teacher's precision.")
    hessian_probes: Optional[_POSITIVE] = Field(None, description="Hessian-vector products stored per structure.")
    fast: Optional[bool] = Field(None, description="The teacher ran on its compiled path (recorded only then).")

    def as_attrs(self) -> dict:
        """The record as stored (settings a runner does not use left out)."""
        return self.model_dump(mode="json", exclude_none=True)


# --- the rules, by field --------------------------------------------------------------------
#: settings whose option is not their name: one ``--feature KEY=PATH`` per hooked feature
_OPTIONS = {"feature_modules": "--feature"}


def option_name(setting: str) -> str:
    """The command-line option of a setting (``shard_atoms`` -> ``--shard-atoms``)."""
    return _OPTIONS.get(setting) or "--" + setting.replace("_", "-")


def choices(setting: str) -> tuple | None:
    """The values a setting allows (its ``Literal``), or None when it is not a choice."""
    if is_switch_or_auto(ExtractRequest.model_fields[setting].annotation):
        return None  # true, false or auto: a switch, checked by its validator

    def find(ann):  # a Literal, or one inside Optional[...] / tuple[...]
        if typing.get_origin(ann) is Literal:
            return typing.get_args(ann)
        return next((found for a in typing.get_args(ann) if (found := find(a)) is not None), None)

    return find(ExtractRequest.model_fields[setting].annotation)


def _lower_bound(setting: str) -> int | None:
    """The exclusive lower bound (``gt``) of a number setting, also inside ``Optional[...]``."""

    def find(metadata) -> int | None:
        for m in metadata:
            if getattr(m, "gt", None) is not None:
                return m.gt
            found = find(getattr(m, "metadata", ()))  # a FieldInfo inside Annotated[...]
            if found is not None:
                return found
        return None

    info = ExtractRequest.model_fields[setting]
    nested = [a for member in typing.get_args(info.annotation) for a in typing.get_args(member)[1:]]
    return find([*info.metadata, *nested])


def field_help(setting: str) -> str:
    """The help of a setting: its description, and its choices where it has them."""
    text = ExtractRequest.model_fields[setting].description or ""
    allowed = choices(setting)
    return f"{text} One of: {', '.join(allowed)}." if allowed and setting != "features" else text


def check_settings(settings: Mapping[str, Any], name: Callable[[str], str] = option_name) -> None:
    """Refuse setting values no store can be made with, before any work: the rules of
    :class:`ExtractRequest`'s fields (choices, positive sizes) and the one between them, with
    messages that say what to do. For :meth:`ExtractRequest.of` (the command line) and a
    recipe's ``store.options`` (``kdcache pipeline validate``, before a teacher is trained).

    Args:
        settings: setting -> value, any of :class:`ExtractRequest`'s fields (values of another
            type are left to the schema's type check). Where only one of ``shard_atoms`` and
            ``chunk_atoms`` is given, the other is its default for the rule that ties them.
        name: how a message names a setting (default: its option, ``--shard-atoms``).

    Raises:
        ConfigError: ``"<name(setting)>: <what is wrong>"``.
    """
    fields = ExtractRequest.model_fields
    given = [(k, settings[k]) for k in fields if settings.get(k) is not None]
    for key, value in given:  # choices first, then sizes (field order)
        allowed = choices(key)
        if key == "features":
            unknown = [f for f in (_feature_list(value) or ()) if f not in allowed]
            if unknown:
                raise ConfigError(f"unknown feature(s) {unknown}; choose from {list(allowed)}")
        elif allowed is not None and value not in allowed:
            raise ConfigError(f"{name(key)}: {value!r} is not one of {', '.join(allowed)}")
    for key, value in given:
        bound = _lower_bound(key)
        if bound is not None and isinstance(value, int) and not isinstance(value, bool) and value <= bound:
            left_out = " (leave it out to store every sample)" if key == "limit" else ""
            raise ConfigError(f"{name(key)}: must be positive, got {value}{left_out}")
    probes = settings.get("hessian_probes")
    if isinstance(settings.get("teacher"), CalculatorSpec) and isinstance(probes, int) and probes > 0:
        # the products are autograd through the teacher's forces; a calculator gives numbers only
        raise ConfigError(f"{name('hessian_probes')}: needs a model teacher (Hessian-vector products are taken by "
                          "autograd through its forces); an ASE calculator teacher gives none")
    if settings.get("fast") is True:
        # the compiled path differentiates its forces once (AOTAutograd: no double backward), and
        # module hooks would have to be traced into it
        # (the other setting by its bare name: `name` may give a whole "recipe r.yaml: key ..." prefix)
        other = option_name if name is option_name else str
        if isinstance(probes, int) and probes > 0:
            raise ConfigError(f"{name('fast')}: {other('hessian_probes')} differentiates the teacher's forces again, "
                              f"which its compiled path cannot; extract without {other('fast')}")
        if settings.get("feature_modules"):
            raise ConfigError(f"{name('fast')}: {other('feature_modules')} hooks modules of the eager teacher; "
                              f"extract without {other('fast')}")
    if "shard_atoms" in settings or "chunk_atoms" in settings:
        # a shard file holds whole inner chunks (format.Layout.plan)
        shard = settings.get("shard_atoms", fields["shard_atoms"].default)
        chunk = settings.get("chunk_atoms", fields["chunk_atoms"].default)
        if all(isinstance(v, int) and v > 0 for v in (shard, chunk)) and shard % chunk:
            key = "shard_atoms" if "shard_atoms" in settings else "chunk_atoms"
            raise ConfigError(f"{name(key)}: shard_atoms ({shard}) must be a multiple of chunk_atoms ({chunk})")
