"""Run configuration of ``kdcache train``: one dataclass, read from YAML, overridden from the CLI.

The resolved configuration is written to ``<out>/config.yaml``; re-running the same command
finds it (and ``last.pt``) and resumes. Every setting's type and range is checked here, once, for
the command line, ``train -c`` files and pipeline recipes alike.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from kdcache.config_yaml import load_yaml
from kdcache.errors import ConfigError
from kdcache.train.data import AUGMENTATIONS
from kdcache.train.strategies import FEATURE_LOSSES, STUDENT_MAPS, format_strategy, parse_strategy

#: how stored feature targets are compared: ``standard`` divides by the store's per-channel
#: statistics (scale-free: a term is ~1 for an uninformed student), ``none`` is the paper's raw MSE
FEATURE_NORMS = ("standard", "none")
SCHEDULERS = ("constant", "warmup_step", "warmup_exp", "plateau")
ATOM_REFS = ("fit", "none")
#: where the training energies and forces come from: the dataset's (``reference``), the
#: teacher's stored ones (``teacher``: the data need no labels), or the dataset's where a sample
#: has them and the teacher's where not (``both``); see :func:`kdcache.train.data.apply_label_source`
LABEL_SOURCES = ("reference", "teacher", "both")

_KIND_NAMES = {int: "int", float: "int or float", str: "str", bool: "true or false", list: "a list", dict: "a mapping"}


@dataclass(frozen=True)
class _Rule:
    """Type and range of one setting (bounds as in pydantic: gt/ge/lt/le).

    Args:
        kind: int, float (ints accepted), str, bool, list or dict.
        optional: None is allowed.
        gt, ge, lt, le: exclusive/inclusive lower and upper bounds.
        choices: the allowed values.
        items: rule of each list item.
    """

    kind: type
    optional: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple = ()
    items: "_Rule | None" = None

    def check(self, value: Any, key: str, where: Callable[[str], str]) -> Any:
        """``value``, normalised, or a ConfigError starting with ``where(key)``."""
        label = where(key)
        if value is None and self.optional:
            return None
        if self.kind is float and isinstance(value, str):
            try:  # PyYAML (YAML 1.1) and hand-made dicts give `1e-4` as a string
                value = float(value)
            except ValueError:
                pass
        if self.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # `max_steps: 1e4`
        if self.kind is list and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # `augment: rotate`
        accepted = (int, float) if self.kind is float else self.kind
        if not isinstance(value, accepted) or (isinstance(value, bool) and self.kind is not bool):
            raise ConfigError(f"{label}: expected {_KIND_NAMES[self.kind]}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label}: must be finite, got {value!r}")
        for bound, op, bad in ((self.gt, ">", lambda v, b: v <= b), (self.ge, ">=", lambda v, b: v < b),
                               (self.lt, "<", lambda v, b: v >= b), (self.le, "<=", lambda v, b: v > b)):
            if bound is not None and bad(value, bound):
                raise ConfigError(f"{label}: must be {op} {bound:g}, got {value!r}")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{label}: {value!r} is not one of {list(self.choices)}")
        if self.items is not None:
            value = [self.items.check(v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return value


_POSITIVE_INT = _Rule(int, ge=1)
_COUNT = _Rule(int, ge=0)
_PATH = _Rule(str, optional=True)
_FRACTION = _Rule(float, ge=0, le=1)
#: every setting but ``strategy`` (parsed by :func:`parse_strategy`); ``lambda_`` is ``lambda``
_RULES: dict[str, _Rule] = {
    "student": _Rule(str),
    "student_overrides": _Rule(dict),
    "data": _PATH,
    "val": _PATH,
    "store": _PATH,
    "lambda_": _Rule(float, optional=True, ge=0),
    "feature_loss": _Rule(str, choices=FEATURE_LOSSES),
    "student_map": _Rule(str, choices=STUDENT_MAPS),
    "feature_norm": _Rule(str, choices=FEATURE_NORMS),
    "out": _Rule(str),
    "max_steps": _Rule(int, optional=True, ge=1),
    "epochs": _Rule(int, optional=True, ge=1),
    "batch_size": _POSITIVE_INT,
    "val_batch_size": _Rule(int, optional=True, ge=1),
    "seed": _COUNT,  # numpy refuses negative seeds
    "device": _Rule(str, optional=True),
    "lr": _Rule(float, gt=0),
    "weight_decay": _Rule(float, ge=0),
    "eval_every": _COUNT,
    "checkpoint_every": _COUNT,
    "num_workers": _COUNT,
    "energy_coef": _Rule(float, ge=0),
    "force_coef": _Rule(float, ge=0),
    "normalize_labels": _Rule(bool),
    "energy_mean": _Rule(float, optional=True),
    "energy_std": _Rule(float, optional=True, gt=0),
    "atom_ref": _Rule(str, choices=ATOM_REFS),
    "labels": _Rule(str, choices=LABEL_SOURCES),
    "scheduler": _Rule(str, choices=SCHEDULERS),
    "warmup_steps": _COUNT,
    "warmup_factor": _FRACTION,  # 0: the reference warm-up starts from zero
    "lr_milestones": _Rule(list, items=_COUNT),
    "lr_gamma": _Rule(float, gt=0),
    "decay_steps": _POSITIVE_INT,
    "decay_rate": _Rule(float, gt=0),
    "plateau_patience": _COUNT,
    "plateau_factor": _Rule(float, gt=0, lt=1),
    "ema_decay": _Rule(float, ge=0, lt=1),  # 0 disables
    "clip_grad": _Rule(float, ge=0),  # 0 disables
    "augment": _Rule(list, items=_Rule(str, choices=AUGMENTATIONS)),
    "window": _Rule(int, optional=True, ge=1),
    "progress": _Rule(bool),
    "deterministic": _Rule(bool),
}


def setting_name(key: Any) -> str:
    """The field name of a YAML/CLI setting name (``lambda`` -> ``lambda_``, dashes -> underscores)."""
    k = str(key).replace("-", "_")
    return "lambda_" if k == "lambda" else k


def _display(name: str) -> str:
    return "lambda" if name == "lambda_" else name


def _key_in(source: str) -> Callable[[str], str]:
    return lambda key: f"{source}: key {key!r}"


def check_setting(name: str, value: Any, where: Callable[[str], str]) -> Any:
    """Check one setting (type and range) on its own; return it normalised.

    Args:
        name: the setting as written (e.g. ``lambda``, ``batch-size``).
        value: its value.
        where: how a message names a key path, e.g. ``lr -> "recipe r.yaml: key 'students.train.lr'"``.

    Raises:
        ConfigError: ``"<where(name)>: <what is wrong>"``; settings without a rule pass unchanged.
    """
    rule = _RULES.get(setting_name(name))
    return value if rule is None else rule.check(value, str(name), where)


def _check_student(student: str, overrides: dict, where: Callable[[str], str]) -> None:
    """The student exists (preset or model registry name) and takes every override."""
    from kdcache.models import MODEL_CLASSES, model_class
    from kdcache.models.presets import PRESETS

    if student in PRESETS:
        model = PRESETS[student][0]
    elif student.lower().replace("-", "_") in MODEL_CLASSES:
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


@dataclass
class TrainConfig:
    """Every setting of a stage-two run (YAML keys are these names; ``lambda`` means ``lambda_``).

    Args:
        student: preset name (``painn-tiny``, ``painn-big``...) or model registry name.
        student_overrides: constructor arguments passed to the preset.
        data: training dataset path.
        val: validation dataset path (optional; without it there is no ``best.pt``).
        store: feature store path (needed by every strategy but ``none``).
        strategy: ``none``, a name, ``"n2n:100,v2v:10"`` or a list (see ``parse_strategy``).
        lambda_: weight of a strategy given without one (default: the strategy's own
            ``default_lambda`` in :data:`kdcache.train.strategies.STRATEGIES`).
        feature_loss: ``mse`` | ``mae`` | ``huber``.
        student_map: ``linear`` | ``identity`` | ``mlp``.
        feature_norm: ``standard`` (default): feature targets are standardised with the store's
            per-channel statistics (scalar: mean/std; vector: RMS norm, no shift), so λ is
            scale-free; ``none``: the raw feature MSE of the paper (Table 6's λ).
        out: run folder.
        max_steps: optimiser steps (takes precedence over ``epochs``).
        epochs: passes over the data when ``max_steps`` is not set.
        batch_size: structures per step and process.
        seed: seed of weights, order, augmentation.
        device: ``cuda``/``cpu``/``cuda:1``; default cuda when available.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        eval_every: validate (EMA weights) and save every K steps (0: only at the end).
        checkpoint_every: also save ``last.pt`` every K steps (0: at validations only).
        num_workers: loader worker processes.
        energy_coef, force_coef: a_E, a_F.
        normalize_labels: train on (E - mean)/std and F/std.
        energy_mean, energy_std: given normalisation (else computed from the training set).
        atom_ref: ``fit`` (default): least-squares per-element reference energies on the training
            set, mean/std then taken on the residual E - Σ ref[Z]; ``none``: no references. Only
            used when the statistics are computed (``normalize_labels`` and no given mean/std).
        labels: the energies and forces trained on: ``reference`` (default: the dataset's
            labels, every sample must have them), ``teacher`` (the store's teacher energy and
            forces, extracted with ``outputs``; the dataset's labels are never read, so
            unlabelled structures train), or ``both`` (a sample's own energy or forces where it
            has them, the teacher's where it has not). Statistics of the normaliser and
            per-element references are taken on the same labels. Validation always uses the
            validation set's reference labels.
        scheduler: ``constant`` | ``warmup_step`` | ``warmup_exp`` | ``plateau``.
        warmup_steps, warmup_factor: linear warm-up from ``warmup_factor·lr`` over these steps.
        lr_milestones, lr_gamma: step decay (multiply by gamma at each milestone step).
        decay_steps, decay_rate: exponential decay ``rate ** (step / decay_steps)``.
        plateau_patience, plateau_factor: reduce-on-plateau on the validation loss.
        ema_decay: EMA of weights (0 disables).
        clip_grad: gradient-norm clipping (0 disables).
        augment: list of augmentations (``rotate``).
        window: locality window of the store's batch sampler (samples; default: the sampler's).
        progress: show a progress bar.
        deterministic: use torch's deterministic kernels (needed for bit-exact resume: e.g. the
            CPU backward of indexing accumulates in a thread-dependent order otherwise).
    """

    student: str = "painn-tiny"
    student_overrides: dict = field(default_factory=dict)
    data: str | None = None
    val: str | None = None
    store: str | None = None
    strategy: Any = "none"
    lambda_: float | None = None
    feature_loss: str = "mse"
    student_map: str = "linear"
    feature_norm: str = "standard"
    out: str = "runs/run"
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 8
    val_batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    lr: float = 5e-4
    weight_decay: float = 0.0
    eval_every: int = 0
    checkpoint_every: int = 0
    num_workers: int = 0
    energy_coef: float = 1.0
    force_coef: float = 100.0
    normalize_labels: bool = True
    energy_mean: float | None = None
    energy_std: float | None = None
    atom_ref: str = "fit"
    labels: str = "reference"
    scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_factor: float = 0.2
    lr_milestones: list = field(default_factory=list)
    lr_gamma: float = 0.1
    decay_steps: int = 100000
    decay_rate: float = 0.1
    plateau_patience: int = 3
    plateau_factor: float = 0.8
    ema_decay: float = 0.999
    clip_grad: float = 10.0
    augment: list = field(default_factory=list)
    window: int | None = None
    progress: bool = True
    deterministic: bool = True

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
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in (values or {}).items():
            k = setting_name(key)
            if k not in names:
                raise ConfigError(f"{where(str(key))}: unknown setting; known: "
                                  f"{', '.join(sorted(_display(n) for n in names))}")
            clean[k] = value
        cfg = cls(**clean)
        cfg.validate(source, where)
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
            return f"option --{_display(top).replace('_', '-')}" if top in from_options else in_file(key)

        return cls.from_dict(values, source=str(path) if path else "command line", where=where)

    def validate(self, source: str = "configuration", where: Callable[[str], str] | None = None) -> None:
        """Check every setting's type and range (normalising e.g. ``"1e-4"`` to a float), the
        strategy, and that the student exists and takes each of ``student_overrides``; before
        any data is opened.

        Args:
            source: where the settings come from, for messages.
            where: how a message names a setting (see :meth:`from_dict`).

        Raises:
            ConfigError: naming the setting, the value and what is allowed.
        """
        where = where or _key_in(source)
        for name, rule in _RULES.items():
            setattr(self, name, rule.check(getattr(self, name), _display(name), where))
        try:
            terms = self.terms
        except ConfigError as exc:
            raise ConfigError(f"{where('strategy')}: {exc}") from None
        bad = [t.name for t in terms if not math.isfinite(t.weight)]
        if bad:
            raise ConfigError(f"{where('strategy')}: weight of {bad[0]} must be finite")
        _check_student(self.student, self.student_overrides, where)

    @property
    def terms(self):
        return parse_strategy(self.strategy, self.lambda_)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategy"] = format_strategy(self.terms)
        d["lambda"] = d.pop("lambda_")
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    #: settings that may change between a run and its resumption
    RESUMABLE_CHANGES = ("max_steps", "epochs", "eval_every", "checkpoint_every", "num_workers", "device",
                         "progress", "val", "val_batch_size",
                         "deterministic")

    def differences(self, other: dict) -> list[str]:
        """Settings that differ from a saved run's (ignoring those a resume may change)."""
        mine = self.to_dict()
        return [k for k in mine if k not in self.RESUMABLE_CHANGES and k in other and other[k] != mine[k]]
