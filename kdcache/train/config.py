"""Run configuration of ``kdcache train``: one dataclass, read from YAML, overridden from the CLI.

The resolved configuration is written to ``<out>/config.yaml``; re-running the same command
finds it (and ``last.pt``) and resumes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcache.errors import ConfigError
from kdcache.train.strategies import FEATURE_LOSSES, STUDENT_MAPS, format_strategy, parse_strategy

SCHEDULERS = ("constant", "warmup_step", "warmup_exp", "plateau")
ATOM_REFS = ("fit", "none")


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
        lambda_: weight of a strategy given without one.
        feature_loss: ``mse`` | ``mae`` | ``huber``.
        student_map: ``linear`` | ``identity`` | ``mlp``.
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
    lambda_: float = 1.0
    feature_loss: str = "mse"
    student_map: str = "linear"
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
    def from_dict(cls, values: dict, source: str = "configuration") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in (values or {}).items():
            k = str(key).replace("-", "_")
            k = "lambda_" if k == "lambda" else k
            if k not in names:
                raise ConfigError(f"{source}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
            clean[k] = value
        cfg = cls(**clean)
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> "TrainConfig":
        """YAML file (optional) with command-line ``overrides`` (``None`` values are ignored)."""
        values: dict = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} not found")
            try:
                values = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {p}: not valid YAML ({exc})") from None
            if not isinstance(values, dict):
                raise ConfigError(f"config file {p}: expected a mapping of settings")
            values = {("lambda_" if k == "lambda" else str(k).replace("-", "_")): v for k, v in values.items()}
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls.from_dict(values, source=str(path) if path else "command line")

    def validate(self, source: str = "configuration") -> None:
        if self.feature_loss not in FEATURE_LOSSES:
            raise ConfigError(f"{source}: feature_loss {self.feature_loss!r} not in {FEATURE_LOSSES}")
        if self.student_map not in STUDENT_MAPS:
            raise ConfigError(f"{source}: student_map {self.student_map!r} not in {STUDENT_MAPS}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"{source}: scheduler {self.scheduler!r} not in {SCHEDULERS}")
        if self.atom_ref not in ATOM_REFS:
            raise ConfigError(f"{source}: atom_ref {self.atom_ref!r} not in {ATOM_REFS}")
        if self.batch_size < 1:
            raise ConfigError(f"{source}: batch_size must be >= 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"{source}: max_steps must be >= 0")
        if isinstance(self.augment, str):
            self.augment = [a for a in self.augment.split(",") if a]
        self.terms  # parses, raises ConfigError on a bad strategy

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
