"""Run configuration of ``kdcache train``: one typed schema, read from YAML, overridden from the CLI.

:class:`TrainConfig` is the one place a training setting is declared: its type, range, allowed
values, default and description (a pydantic field). The ``train -c`` YAML loader, the pipeline
recipe's ``train:`` sections (:mod:`kdcache.pipeline.recipe`) and the ``kdcache train`` options
(``cli/train.py``) all derive from it, so they accept and refuse the same values; adding a setting
is one field here.

The resolved configuration is written to ``<out>/config.yaml``; re-running the same command
finds it (and ``last.pt``) and resumes.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import yaml
from pydantic import Field

from kdcache.config_yaml import load_yaml
from kdcache.errors import ConfigError
from kdcache.settings import Schema, choice, integer, number, switch_or_auto, text_list, validated
from kdcache.train.strategies import FEATURE_LOSSES, STRATEGIES, STUDENT_MAPS, format_strategy, parse_strategy

#: e.g. ``n2n 30, e2n 3, ...``: the help text follows the one table
_DEFAULT_LAMBDAS = ", ".join(f"{s.name} {s.default_lambda:g}" for s in STRATEGIES.values())

#: how stored feature targets are compared: ``standard`` divides by the store's per-channel
#: statistics (scale-free: a term is ~1 for an uninformed student), ``none`` is the paper's raw MSE
FEATURE_NORMS = ("standard", "none")
SCHEDULERS = ("constant", "warmup_step", "warmup_exp", "plateau")
ATOM_REFS = ("fit", "none")
#: where the training energies and forces come from: the dataset's (``reference``), the
#: teacher's stored ones (``teacher``: the data need no labels), or the dataset's where a sample
#: has them and the teacher's where not (``both``); see :func:`kdcache.train.data.apply_label_source`
LABEL_SOURCES = ("reference", "teacher", "both")
#: augmentations of the training structures (implemented in :mod:`kdcache.train.data`, which
#: moves the stored targets along)
AUGMENTATIONS = ("rotate",)

_COUNT = integer(ge=0)
_POSITIVE = integer(ge=1)


def setting_name(key: Any) -> str:
    """The field name of a YAML/CLI setting name (``lambda`` -> ``lambda_``, dashes -> underscores)."""
    k = str(key).replace("-", "_")
    return "lambda_" if k == "lambda" else k


def display_name(name: str) -> str:
    """The name a user writes for a field (``lambda_`` -> ``lambda``)."""
    return "lambda" if name == "lambda_" else name


def _key_in(source: str) -> Callable[[str], str]:
    return lambda key: f"{source}: key {key!r}"


class TrainConfig(Schema):
    """Every setting of a stage-two run. YAML keys are the field names (``lambda`` is ``lambda_``);
    each field's description is its documentation (and the ``kdcache train --help`` text).

    Build it from user input with :meth:`from_dict` or :meth:`load`: they name the file, option
    and key of a refused value in a :class:`~kdcache.errors.ConfigError` (``TrainConfig(**kw)``
    checks the same types and ranges, with pydantic's own error).
    """

    student: str = Field("painn-tiny", description="Student preset (``painn-tiny``, ``painn-big``, ``schnet``, ...) "
                         "or model registry name.")
    student_overrides: dict = Field(default_factory=dict, description="Constructor arguments passed to the preset.")
    data: str | None = Field(None, description="Training dataset (LMDB file/folder, ASE file).")
    val: str | None = Field(None, description="Validation dataset, validated with EMA weights (without it there "
                            "is no ``best.pt``).")
    store: str | None = Field(None, description="Feature store written by ``kdcache extract`` on the training "
                              "data (needed by every strategy but ``none``).")
    strategy: Any = Field("none", description=f"``none``, a strategy ({', '.join(STRATEGIES)}), weighted "
                          "``n2n:100,v2v:10`` or a list (see :func:`kdcache.train.strategies.parse_strategy`).")
    lambda_: number(ge=0) | None = Field(None, alias="lambda", description=(
        "Weight of a strategy named without one (default: the strategy's own ``default_lambda`` in "
        f":data:`kdcache.train.strategies.STRATEGIES`: {_DEFAULT_LAMBDAS})."))
    feature_loss: choice(FEATURE_LOSSES) = Field("mse", description="How a feature strategy compares its targets.")
    student_map: choice(STUDENT_MAPS) = Field("linear", description="The learned map from student to teacher "
                                              "features (``mlp``: scalar targets only).")
    feature_norm: choice(FEATURE_NORMS) = Field("standard", description=(
        "``standard``: feature targets are standardised with the store's per-channel statistics (scalar: "
        "mean/std; vector: RMS norm, no shift), so lambda is scale-free; ``none``: the raw feature MSE of the "
        "paper (Table 6's lambda)."))
    out: str = Field("runs/run", description="Run folder (config, checkpoints, metrics). Re-run to resume.")
    max_steps: _POSITIVE | None = Field(None, description="Optimiser steps (takes precedence over ``epochs``).")
    epochs: _POSITIVE | None = Field(None, description="Passes over the training data when ``max_steps`` is not set.")
    batch_size: _POSITIVE = Field(8, description="Structures per step and process.")
    val_batch_size: _POSITIVE | None = Field(None, description="Structures per validation batch (default: "
                                             "``batch_size``).")
    seed: _COUNT = Field(0, description="Seed of weights, order and augmentation (numpy refuses negative seeds).")
    device: str | None = Field(None, description="``cuda``, ``cpu``, ``cuda:1`` (default: cuda when available).")
    lr: number(gt=0) = Field(5e-4, description="Peak learning rate.")
    weight_decay: number(ge=0) = Field(0.0, description="AdamW weight decay.")
    eval_every: _COUNT = Field(0, description="Validate (EMA weights) and save every K steps (0: only at the end).")
    checkpoint_every: _COUNT = Field(0, description="Also save ``last.pt`` every K steps (0: at validations only).")
    num_workers: _COUNT = Field(0, description="Data loader worker processes.")
    energy_coef: number(ge=0) = Field(1.0, description="Energy loss coefficient a_E.")
    force_coef: number(ge=0) = Field(100.0, description="Force loss coefficient a_F.")
    normalize_labels: bool = Field(True, description="Train on (E - mean)/std and F/std.")
    energy_mean: number() | None = Field(None, description="Given energy mean of the normalisation (else computed "
                                         "from the training set).")
    energy_std: number(gt=0) | None = Field(None, description="Given energy std of the normalisation (else computed "
                                            "from the training set).")
    atom_ref: choice(ATOM_REFS) = Field("fit", description=(
        "``fit``: least-squares per-element reference energies on the training set, mean/std then taken on the "
        "residual E - sum ref[Z]; ``none``: no references. Only used when the statistics are computed "
        "(``normalize_labels`` and no given mean/std)."))
    labels: choice(LABEL_SOURCES) = Field("reference", description=(
        "The energies and forces trained on: ``reference`` (the dataset's labels, every sample must have them), "
        "``teacher`` (the store's teacher energy and forces, extracted with ``outputs``; the dataset's labels are "
        "never read, so unlabelled structures train), or ``both`` (a sample's own energy or forces where it has "
        "them, the teacher's where it has not). The normaliser's statistics and per-element references are taken "
        "on the same labels; validation always uses the validation set's reference labels."))
    scheduler: choice(SCHEDULERS) = Field("constant", description="Learning-rate schedule.")
    warmup_steps: _COUNT = Field(0, description="Linear warm-up from ``warmup_factor`` x lr over these steps.")
    warmup_factor: number(ge=0, le=1) = Field(0.2, description="Start of the warm-up, a fraction of lr (0: the "
                                              "reference warm-up starts from zero).")
    lr_milestones: text_list(_COUNT) = Field(default_factory=list, description="Steps at which ``warmup_step`` "
                                        "multiplies lr by ``lr_gamma``.")
    lr_gamma: number(gt=0) = Field(0.1, description="Factor of each step decay.")
    decay_steps: _POSITIVE = Field(100000, description="``warmup_exp``: lr x ``decay_rate ** (step / decay_steps)``.")
    decay_rate: number(gt=0) = Field(0.1, description="``warmup_exp``: the decay per ``decay_steps``.")
    plateau_patience: _COUNT = Field(3, description="``plateau``: validations without improvement before a cut.")
    plateau_factor: number(gt=0, lt=1) = Field(0.8, description="``plateau``: factor of each cut.")
    ema_decay: number(ge=0, lt=1) = Field(0.999, description="Decay of the EMA of weights (0 disables).")
    clip_grad: number(ge=0) = Field(10.0, description="Gradient-norm clipping (0 disables).")
    augment: text_list(choice(AUGMENTATIONS)) = Field(default_factory=list, description=(
        "Augmentations (``rotate``: random rotations; the stored targets rotate along)."))
    window: _POSITIVE | None = Field(None, description="Locality window of the store's batch sampler (samples; "
                                     "default: the sampler's).")
    fast: switch_or_auto() = Field("auto", description=(
        "Train the student on its compiled path (kdcache.models.fast: torch.compile, same weights and checkpoints, "
        "the same numbers to float32 round-off; training steps 5-11x faster on 1-2 CPU threads, see "
        "docs/benchmarks-models.md). The first steps compile (seconds from the on-disk cache, a minute or more "
        "cold). ``auto`` (the default; neither switch): compiled when the run's eager time, estimated from one timed batch, would save more "
        "than a cold compile (on the CPU; kdcache.models.fast_auto), and says so. Decides the trajectory, so the "
        "chosen value is written to config.yaml and a resume keeps it. Not with the hessian strategy."))
    progress: bool = Field(True, description="Show a progress bar.")
    deterministic: bool = Field(True, description=(
        "Use torch's deterministic kernels (needed for bit-exact resume: e.g. the CPU backward of indexing "
        "accumulates in a thread-dependent order otherwise)."))

    #: settings that may change between a run and its resumption
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = (
        "max_steps", "epochs", "eval_every", "checkpoint_every", "num_workers", "device", "progress", "val",
        "val_batch_size", "deterministic")

    @classmethod
    def unknown_key_message(cls, known: list[str]) -> str:
        return f"unknown setting; known: {', '.join(sorted(known))}"

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping | None, source: str = "configuration",
                  where: Callable[[str], str] | None = None) -> "TrainConfig":
        """Settings from a mapping, checked (see :meth:`validate`).

        Args:
            values: setting -> value (YAML names: ``lambda`` for ``lambda_``, dashes for underscores).
            source: where the values come from, for messages (a file, ``command line``).
            where: how a message names a setting, ``key path -> text`` (default
                ``"<source>: key 'lr'"``); the command line names options instead (``option --lr``).

        Raises:
            ConfigError: an unknown setting, or a value of the wrong type or out of range, named.
        """
        where = where or _key_in(source)
        clean = {_user_key(k): v for k, v in (values or {}).items()}
        cfg = validated(cls, clean, where)
        cfg._check_together(where)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> "TrainConfig":
        """YAML file (optional) with command-line ``overrides`` (``None`` values are ignored).

        Errors name the option for a value given on the command line and the file and key for one
        read from the file.
        """
        values: dict = {}
        from_options: set[str] = set()
        if path is not None:
            values = load_yaml(path, what="config file") or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path}: expected a mapping of settings")
            values = {setting_name(k): v for k, v in values.items()}
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
                from_options.add(key)
        in_file = _key_in(f"config file {path}" if path is not None else "command line")

        def where(key: str) -> str:
            top = setting_name(re.split(r"[.\[]", key)[0])  # `student_overrides.x`, `augment[0]`
            return f"option --{display_name(top).replace('_', '-')}" if top in from_options else in_file(key)

        return cls.from_dict(values, source=str(path) if path else "command line", where=where)

    def validate(self, source: str = "configuration", where: Callable[[str], str] | None = None) -> None:
        """Check the settings together, before any data is opened: every value again (one set
        after construction too), the strategy, and that the student exists and takes each of
        ``student_overrides``.

        Args:
            source: where the settings come from, for messages.
            where: how a message names a setting (see :meth:`from_dict`).

        Raises:
            ConfigError: naming the setting, the value and what is allowed.
        """
        where = where or _key_in(source)
        checked = validated(type(self), self.model_dump(by_alias=True), where)
        for name in type(self).model_fields:
            setattr(self, name, getattr(checked, name))
        self._check_together(where)

    def _check_together(self, where: Callable[[str], str]) -> None:
        """What one field alone cannot say: the strategy (with ``lambda``) and the student."""
        try:
            terms = self.terms
        except ConfigError as exc:
            raise ConfigError(f"{where('strategy')}: {exc}") from None
        bad = [t.name for t in terms if not math.isfinite(t.weight)]
        if bad:
            raise ConfigError(f"{where('strategy')}: weight of {bad[0]} must be finite")
        twice = [t.name for t in terms if t.spec.differentiates_forces]
        if self.fast is True and twice:
            raise ConfigError(f"{where('fast')}: strategy {twice[0]} differentiates the student's forces again, which "
                              "its compiled path cannot (torch.compile has no double backward); train it without fast")
        _check_student(self.student, self.student_overrides, where)

    @property
    def terms(self):
        """The parsed strategy (:func:`kdcache.train.strategies.parse_strategy`)."""
        return parse_strategy(self.strategy, self.lambda_)

    def to_dict(self) -> dict:
        """The settings as YAML writes them (``lambda``; the strategy in its canonical form)."""
        d = self.model_dump(by_alias=True)
        d["strategy"] = format_strategy(self.terms)
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def differences(self, other: dict) -> list[str]:
        """Settings that differ from a saved run's (ignoring those a resume may change)."""
        mine = self.to_dict()
        return [k for k in mine if k not in self.RESUMABLE_CHANGES and k in other and other[k] != mine[k]]


def check_setting(name: str, value: Any, where: Callable[[str], str]) -> Any:
    """Check one setting (type and range) on its own; return it normalised.

    Args:
        name: the setting as written (e.g. ``lambda``, ``batch-size``).
        value: its value.
        where: how a message names a key path, e.g. ``lr -> "recipe r.yaml: key 'students.train.lr'"``.

    Raises:
        ConfigError: ``"<where(name)>: <what is wrong>"``, an unknown setting too.
    """
    key = _user_key(name)
    checked = validated(TrainConfig, {key: value}, lambda path: where(str(name) + path[len(key):]))
    return getattr(checked, setting_name(name))


def _user_key(key: Any) -> str:
    """The key a user writes for a setting in any spelling (``lambda_``, ``batch-size`` ->
    ``lambda``, ``batch_size``; a message names it so), or ``key`` as given if it names none."""
    field = setting_name(key)
    return display_name(field) if field in TrainConfig.model_fields else str(key)


def _check_student(student: str, overrides: dict, where: Callable[[str], str]) -> None:
    """The student exists (preset or model registry name) and takes every override."""
    from kdcache.models import MODEL_CLASSES, is_model_name, model_class
    from kdcache.models.presets import PRESETS

    if student in PRESETS:
        model = PRESETS[student][0]
    elif is_model_name(student):
        model = student
    else:
        raise ConfigError(f"{where('student')}: unknown student {student!r}; presets: {', '.join(sorted(PRESETS))}; "
                          f"models: {', '.join(sorted(MODEL_CLASSES))}")
    params = inspect.signature(model_class(model).__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    takes = sorted(n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL)
    for key in overrides:
        if key not in takes:
            raise ConfigError(f"{where(f'student_overrides.{key}')}: {model} takes no argument {key!r}; "
                              f"it takes: {', '.join(takes)}")
