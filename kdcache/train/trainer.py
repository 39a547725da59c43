"""The stage-two trainer: student + stored targets, AdamW(AMSGrad), schedules, EMA, exact resume, DDP.

The teacher is never built, imported or read here: targets come from the store only.

Exact resume: ``last.pt`` holds the weights, optimiser, schedule, EMA, the position in the data
order (epoch and batches done in it), the best validation loss and the RNG states. The order of
batches and the augmentation depend only on (seed, epoch, index), so re-running the same command
replays exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcache import distributed as D
from kdcache import keys as K
from kdcache.data.batch import LABELS, dataset_index, non_finite_error, require_fields
from kdcache.errors import CheckpointError, ConfigError, DataError, NumericalError, StoreError
from kdcache.train.config import TrainConfig
from kdcache.train.data import (
    TEACHER_LABEL_KEYS,
    JoinedDataset,
    LabelledLoader,
    SkipBatches,
    make_batch_sampler,
    make_loader,
)
from kdcache.train.ema import EMA
from kdcache.train.objective import DistillationObjective, build_maps, feature_widths
from kdcache.train.schedule import LRSchedule
from kdcache.train.strategies import check_student, resolve_store_keys

LAST, BEST = "last.pt", "best.pt"
CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.csv"
NORMALIZER_MAX_SAMPLES = 20000


def build_student(name: str, overrides: dict | None = None) -> nn.Module:
    """A student from a preset name (``painn-tiny``) or a model registry name (``painn``)."""
    from kdcache.models import build_model, is_model_name
    from kdcache.models.presets import build_preset

    overrides = dict(overrides or {})
    try:
        return build_preset(name, **overrides)
    except (KeyError, ValueError) as exc:
        preset_error = exc
    if is_model_name(name):
        return build_model(name, **overrides)
    raise ConfigError(f"unknown student {name!r}: {preset_error}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as plain data (checkpoints are loaded with weights_only=True)
    numpy_state = [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sample_indices(n: int, max_samples: int, seed: int):
    if n > max_samples:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].tolist()
    return range(n)


def _labelled_energies(dataset, max_samples: int, seed: int, store=None, labels: str = "reference"
                       ) -> tuple[list[float], list[np.ndarray]]:
    """Energies and compositions of (a seeded subset of) the training samples, for the normaliser:
    the energies training uses (``labels``, see :attr:`TrainConfig.labels`).

    Args:
        dataset: the training set.
        max_samples: at most this many (a seeded subset).
        seed: the subset's seed.
        store: the feature store (the teacher's energies; needed unless ``labels`` is ``reference``).
        labels: ``reference``, ``teacher`` or ``both``.

    Raises:
        DataError: a sample without energy/forces (``reference``) or with a non-finite energy
            (its file, its index): statistics over it would make the normaliser, and every
            weight, NaN.
    """
    indices = [int(i) for i in _sample_indices(len(dataset), max_samples, seed)]
    # one read of the teacher's energies (per sample, no per-atom rows)
    teacher = store.read(indices, keys=())[K.ENERGY].double().numpy() if labels != "reference" else None
    energies, comps = [], []
    for j, i in enumerate(indices):
        sample = dataset[i]
        if teacher is not None and (labels == "teacher" or getattr(sample, K.ENERGY, None) is None):
            e = float(teacher[j])
            if not math.isfinite(e):
                raise DataError(getattr(store, "path", "the store"), i, K.ENERGY, "the teacher's energy is NaN or infinite")
        else:
            if labels == "reference":
                require_fields(sample, dataset, LABELS, i)
            e = float(sample[K.ENERGY].reshape(-1)[0])
            if not math.isfinite(e):
                raise non_finite_error(dataset, dataset_index(sample, i), K.ENERGY, 1, sample[K.ENERGY].dtype)
        energies.append(e)
        comps.append(sample[K.ATOMIC_NUMBERS].reshape(-1).cpu().numpy())
    return energies, comps


def label_statistics(dataset, max_samples: int = NORMALIZER_MAX_SAMPLES, seed: int = 0, store=None,
                     labels: str = "reference") -> tuple[float, float]:
    """Mean and std of the training energies (a seeded subset for very large sets; ``store`` and
    ``labels`` as in :func:`_labelled_energies`)."""
    energies = torch.tensor(_labelled_energies(dataset, max_samples, seed, store, labels)[0], dtype=torch.float64)
    std = float(energies.std()) if energies.numel() > 1 else 1.0
    return float(energies.mean()), (std if std > 0 else 1.0)


def fit_atom_refs(energies, compositions) -> np.ndarray:
    """Per-element reference energies by least squares: E_s ≈ Σ_Z count_sZ · ref_Z.

    Args:
        energies: ``[S]`` energies (eV).
        compositions: per structure, the atomic numbers of its atoms.

    Returns:
        ``[119]`` float64 table, zero for elements absent from the data. Deterministic (same
        data -> same table), so every DDP process can fit it on its own.
    """
    from kdcache.models.base import NUM_ELEMENTS

    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    counts = np.zeros((len(e), NUM_ELEMENTS), dtype=np.float64)
    for s, z in enumerate(compositions):
        np.add.at(counts[s], np.asarray(z, dtype=np.int64).reshape(-1), 1.0)
    present = np.flatnonzero(counts.sum(axis=0) > 0)
    ref = np.zeros(NUM_ELEMENTS, dtype=np.float64)
    if len(e) and len(present):
        sol, *_ = np.linalg.lstsq(counts[:, present], e, rcond=None)  # min-norm when rank-deficient
        ref[present] = sol
    return ref


def label_statistics_with_refs(dataset, max_samples: int = NORMALIZER_MAX_SAMPLES, seed: int = 0, store=None,
                               labels: str = "reference") -> tuple[float, float, np.ndarray]:
    """Fitted per-element references, then mean and std of the residual energies E - Σ ref[Z]
    (``store`` and ``labels`` as in :func:`_labelled_energies`)."""
    energies, comps = _labelled_energies(dataset, max_samples, seed, store, labels)
    ref = fit_atom_refs(energies, comps)
    resid = np.asarray(energies, dtype=np.float64) - np.array([ref[z].sum() for z in comps], dtype=np.float64)
    std = float(resid.std(ddof=1)) if resid.size > 1 else 1.0
    return (float(resid.mean()) if resid.size else 0.0), (std if std > 0 else 1.0), ref


def save_model_checkpoint(path: Path, student: nn.Module, trainer_state: dict | None = None) -> None:
    """Write a kdcache checkpoint of ``student`` (its current weights) with ``trainer_state`` in
    its ``extra`` (plain data only: the file is read back with ``weights_only=True``)."""
    from kdcache.models.checkpoint import save_checkpoint

    save_checkpoint(path, student, extra={"trainer_state": trainer_state} if trainer_state is not None else None)


def read_trainer_state(path: Path) -> dict:
    from kdcache.models.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(path)  # data only, like every checkpoint kdcache reads
    except CheckpointError as exc:  # a torn or foreign file
        raise ConfigError(f"{exc}; it cannot be resumed: remove it or choose another --out") from None
    state = (ckpt.get("extra") or {}).get("trainer_state")
    if not state:
        raise ConfigError(f"{path} has no trainer state; it cannot be resumed (use another --out)")
    return state


class Trainer:
    """Train a student with the configured strategies.

    Args:
        config: the run configuration.
        train_dataset: the training dataset (default: ``open_dataset(config.data)``).
        val_dataset: validation dataset (default: ``open_dataset(config.val)`` when set).
        store: feature store (default: ``FeatureStore.open(config.store, dataset=train)`` when set).
    """

    def __init__(self, config: TrainConfig, train_dataset=None, val_dataset=None, store=None):
        self.cfg = config
        self.device = D.pick_device(config.device)
        self.rank, self.world = D.setup(self.device)
        self.is_main = self.rank == 0
        self.out = Path(config.out)
        self.terms = config.terms
        self.train_dataset = train_dataset if train_dataset is not None else self._open_dataset(config.data, "data")
        self.val_dataset = val_dataset if val_dataset is not None else (
            self._open_dataset(config.val, "val") if config.val else None)
        self.store = store if store is not None else self._open_store()
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best = math.inf
        self._saved_step: int | None = None  # step of the weights in last.pt (None: none written)
        self._resume_state: dict | None = None  # last.pt's trainer state, when deciding `fast` read it
        self._last_batch: torch.Tensor | None = None  # sample indices of the last step's batch
        self._setup_model()

    # --- inputs ---------------------------------------------------------------------------
    @staticmethod
    def _open_dataset(path, what):
        if not path:
            raise ConfigError(f"no {what} dataset given (--{what})")
        from kdcache.data import open_dataset

        return open_dataset(path)

    def _open_store(self):
        labels = self.cfg.labels
        if not self.terms and labels == "reference":
            return None  # the baseline reads no store, even when one is named
        needs = f"strategy {self.cfg.to_dict()['strategy']}" if self.terms else f"--labels {labels}"
        if not self.cfg.store:
            raise ConfigError(f"{needs} needs a feature store (--store)")
        from kdcache.store import FeatureStore

        try:
            store = FeatureStore.open(self.cfg.store, dataset=self.train_dataset, require_complete=True)
        except StoreError as exc:
            raise ConfigError(f"store {self.cfg.store} cannot be used for training on {self.cfg.data}: {exc}") from exc
        lacking = [k for k in TEACHER_LABEL_KEYS if k not in store.feature_keys]
        if labels != "reference" and lacking:
            raise ConfigError(f"--labels {labels} trains on the teacher's energy and forces, but store {self.cfg.store} "
                              f"holds {list(store.feature_keys)}; extract with --features ...,outputs")
        return store

    # --- model ----------------------------------------------------------------------------
    def _setup_model(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        student = build_student(cfg.student, cfg.student_overrides)
        check_student(self.terms, student)
        teacher = None
        if self.store is not None:
            teacher = (getattr(self.store, "provenance", {}) or {}).get("teacher", {})
            teacher = teacher.get("name") if isinstance(teacher, dict) else teacher
        self.store_keys = resolve_store_keys(
            self.terms, getattr(self.store, "feature_keys", None) if self.store is not None else None,
            teacher_name=teacher, store_path=str(cfg.store or "the store"))
        needed = sorted({k for keys in self.store_keys.values() for k in keys})
        self.train_joined = JoinedDataset(self.train_dataset, self.store, needed, cfg.augment, seed=cfg.seed,
                                          labels=cfg.labels)
        if not cfg.normalize_labels:
            mean, std = 0.0, 1.0
        elif cfg.energy_mean is not None and cfg.energy_std is not None:
            mean, std = float(cfg.energy_mean), float(cfg.energy_std)
        elif (self.out / LAST).exists():
            mean, std = 0.0, 1.0  # a resumed run restores the normaliser from last.pt
        elif cfg.atom_ref == "fit":
            mean, std, ref = label_statistics_with_refs(self.train_dataset, seed=cfg.seed, store=self.store,
                                                        labels=cfg.labels)
            student.normalizer.atom_ref.copy_(torch.from_numpy(ref))
        else:
            mean, std = label_statistics(self.train_dataset, seed=cfg.seed, store=self.store, labels=cfg.labels)
        student.normalizer.energy_mean.fill_(mean)
        student.normalizer.energy_std.fill_(std)
        student.normalizer.forces_std.fill_(std)
        student.to(self.device)
        self.sampler = make_batch_sampler(len(self.train_joined), cfg.batch_size, shuffle=True, seed=cfg.seed,
                                          rank=self.rank, world_size=self.world, window=cfg.window,
                                          drop_last=self.world > 1)
        per_epoch = len(self.sampler)
        if per_epoch == 0:
            raise ConfigError(f"no full batch of {cfg.batch_size} per process in {len(self.train_joined)} samples")
        self.steps_per_epoch = per_epoch
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else (cfg.epochs or 1) * per_epoch
        self.fast_decision = self._decide_fast(student)
        cfg.fast = self.fast_decision.fast  # what config.yaml and the checkpoints record
        if cfg.fast:
            from kdcache.models.fast import fast_model  # torch.compile only for those who ask for it

            try:
                student = fast_model(student)  # a view: the same parameters, so checkpoints are unchanged
            except TypeError as exc:
                raise ConfigError(f"fast: {exc}") from None
        maps = {}
        if any(t.spec.student_feature for t in self.terms):
            probe = self.train_joined.__getitems__(list(range(min(2, len(self.train_joined)))))
            from kdcache.train.data import collate

            widths = feature_widths(student, collate(probe).to(self.device), self.terms, self.store_keys)
            maps = build_maps(self.terms, widths, cfg.student_map)
        standardizers = {}
        if cfg.feature_norm == "standard":
            standardizers = {t.name: self.store.standardizer(self.store_keys[t.name][0])
                             for t in self.terms if t.spec.standardized}
        self.objective = DistillationObjective(student, self.terms, self.store_keys, maps, cfg.feature_loss,
                                               cfg.energy_coef, cfg.force_coef, standardizers).to(self.device)
        self.student = student
        self.model = self.objective
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
        self.schedule = LRSchedule(self.optimizer, cfg.scheduler, cfg.lr, cfg.warmup_steps, cfg.warmup_factor,
                                   cfg.lr_milestones, cfg.lr_gamma, cfg.decay_steps, cfg.decay_rate,
                                   cfg.plateau_patience, cfg.plateau_factor)
        self.ema = EMA(self.objective, cfg.ema_decay) if cfg.ema_decay > 0 else None

    def _decide_fast(self, student) -> "FastDecision":
        """Resolve ``fast`` (:mod:`kdcache.models.fast_auto`): ``auto`` keeps a resumed run's
        choice, else weighs one timed eager step of the run's own first samples; rank 0 decides
        for every process."""
        from kdcache.models.fast_auto import AUTO, FastDecision

        cfg = self.cfg

        def decide() -> FastDecision:
            if cfg.fast == AUTO and (self.out / LAST).exists():
                self._resume_state = read_trainer_state(self.out / LAST)  # resume() reads no second time
                # a run saved before the setting existed ran eagerly: it has no `fast`
                kept = self._resume_state.get("config", {}).get("fast", False) is True
                return FastDecision(kept, f"auto: kept from the run in {self.out}")
            return self._weigh_fast(student)

        decision = D.rank0_result(decide, "decide the fast path")
        if cfg.fast == AUTO and self.is_main and not decision.quiet:
            print(decision.describe(), file=sys.stderr)
        return decision

    def _weigh_fast(self, student) -> "FastDecision":
        """``fast`` resolved for a new run (:func:`kdcache.models.fast_auto.decide_fast`)."""
        from kdcache.models.fast_auto import decide_fast, eager_batch_seconds

        cfg = self.cfg
        twice = [t.name for t in self.terms if t.spec.differentiates_forces]

        def time_step() -> float:  # forward, forces, backward; no optimiser step, no RNG drawn
            from kdcache.train.data import collate

            batch = collate(self.train_joined.__getitems__(list(range(min(cfg.batch_size, len(self.train_joined))))))
            batch = batch.to(self.device)
            params = [p for p in student.parameters() if p.requires_grad]

            def step():
                out = student(batch)
                loss = out[K.ENERGY].square().sum() + (out[K.FORCES].square().sum() if K.FORCES in out else 0.0)
                torch.autograd.grad(loss, params, allow_unused=True)

            was_training = student.training
            student.train()
            try:
                return eager_batch_seconds(step, self.device)
            finally:
                student.train(was_training)

        return decide_fast(cfg.fast, student, "training", self.total_steps, self.device, time_step,
                           cannot=f"strategy {twice[0]} differentiates the forces again" if twice else None)

    # --- checkpoints ----------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "best": self.best,
            # copies: the tensors of state_dict() alias the parameters, which the EMA swap overwrites
            "objective": {k: v.detach().clone() for k, v in self.objective.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "rng": rng_state(), "config": self.cfg.to_dict(), "world_size": self.world,
            "strategy": {t.name: t.weight for t in self.terms}, "store_keys": self.store_keys,
        }

    def _averaged(self):
        return self.ema.average_parameters() if self.ema else _nullcontext()

    def save(self, best: bool = False) -> None:
        self._require_finite_weights()  # every process: they hold the same weights and stop together
        if not self.is_main:
            return
        state = self.trainer_state()
        with self._averaged():  # the model weights of a checkpoint are the EMA weights
            save_model_checkpoint(self.out / LAST, self.student, state)
            if best:
                save_model_checkpoint(self.out / BEST, self.student, state)
        self._saved_step = self.step

    def _kept(self) -> str:
        """What is on disk after a stop, for error messages. Not presented as a good fallback:
        weights that are still finite may already be diverging (a too high learning rate makes
        them grow for several steps before the loss overflows), which only an evaluation tells."""
        if self._saved_step is None:
            return "no checkpoint was written"
        return (f"{self.out / LAST} keeps the weights of step {self._saved_step}. They may already be diverging "
                "(then `kdcache eval` of it fails on NaN predictions)")

    def _require_finite_weights(self) -> None:
        """Refuse to validate or save NaN/infinite weights, so ``last.pt``/``best.pt`` keep the last
        good ones. A finite loss can still have gradients that overflow; the next step's loss
        check would catch that too, but a checkpoint may come first. Runs at checkpoints only.

        Raises:
            NumericalError: naming the step and the samples of its batch.
        """
        tensors = [p.detach() for p in self.objective.parameters()] + (list(self.ema.shadow) if self.ema else [])
        if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):  # one host sync
            return
        cause = "before this run's first step"
        if self._last_batch is not None:
            cause = (f"the gradients of the batch of samples {self._last_batch.view(-1).tolist()} of {self.cfg.data} "
                     "overflowed")
        raise NumericalError(
            f"step {self.step}: the weights became NaN or infinite ({cause}); training stopped, {self._kept()}. "
            "Lower --lr or clip_grad (--config), or check those samples' labels")

    def resume(self) -> bool:
        path = self.out / LAST
        if not path.exists():
            return False
        state, self._resume_state = self._resume_state or read_trainer_state(path), None
        diff = self.cfg.differences(state.get("config", {}))
        if diff:
            raise ConfigError(
                f"{self.out} holds a run with other settings ({', '.join(diff)}); resume with the same "
                "settings or choose another --out")
        if state.get("world_size", 1) != self.world:
            raise ConfigError(f"{path} was written by {state.get('world_size')} processes, this run has {self.world}")
        objective_state = dict(state["objective"])
        # runs saved before per-element references existed: their normaliser had none
        objective_state.setdefault("student.normalizer.atom_ref", torch.zeros_like(self.student.normalizer.atom_ref))
        self.objective.load_state_dict(objective_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch, self.best = int(state["batch_in_epoch"]), float(state["best"])
        self._saved_step = self.step
        set_rng_state(state["rng"])
        return True

    # --- validation & logs -----------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Metrics of the EMA weights on the validation set; each process takes a shard and the
        counts are summed, so no process idles (or times out) while another validates."""
        from kdcache.evaluate import evaluate_model

        if self.val_dataset is None:
            return {}
        shard = self.val_dataset
        if self.world > 1:
            shard = torch.utils.data.Subset(self.val_dataset, range(self.rank, len(self.val_dataset), self.world))
        loader = LabelledLoader(shard, batch_size=self.cfg.val_batch_size or self.cfg.batch_size, shuffle=False,
                                num_workers=self.cfg.num_workers)
        with self._averaged():
            sums = evaluate_model(self.student, loader, self.device)
        sums.all_reduce(self.device)
        result = sums.result()
        std = float(self.student.normalizer.energy_std)
        result["loss"] = (self.cfg.energy_coef * result["energy_mae"] + self.cfg.force_coef * result["force_l2mae"]) / (1000.0 * std)
        self.schedule.on_validation(result["loss"])
        return result

    def _metrics_columns(self) -> list[str]:
        cols = ["step", "epoch", "lr", "train_loss", "train_energy", "train_forces"]
        cols += [f"train_{t.name}" for t in self.terms]
        cols += ["val_loss", "val_energy_mae", "val_force_mae", "val_force_cos", "val_efwt", "elapsed_s"]
        return cols

    def _trim_metrics(self) -> None:
        """Drop rows written after the checkpoint we resume from (they will be written again)."""
        path = self.out / METRICS_FILE
        if not (self.is_main and path.exists()):
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._metrics_columns())
            w.writeheader()
            for r in rows:
                if int(r["step"]) <= self.step:
                    w.writerow(r)

    def log(self, train: dict[str, float], val: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
               "elapsed_s": round(time.perf_counter() - self._t0, 3)}
        row.update({f"train_{k}": v for k, v in train.items()})
        row.update({f"val_{k}": val[k] for k in ("loss", "energy_mae", "force_mae", "force_cos", "efwt") if k in val})
        path = self.out / METRICS_FILE
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._metrics_columns(), extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self._tb.add_scalar(k.replace("_", "/", 1), v, self.step)

    # --- the loop --------------------------------------------------------------------------
    def _checkpoint_point(self) -> None:
        self._require_finite_weights()  # before validation: no NaN metrics row either
        train = {k: v / max(self._n, 1) for k, v in self._sums.items()}
        self._sums, self._n = {}, 0
        try:
            val = self.validate()
        except NumericalError as exc:  # finite but diverged weights: nothing worth saving
            raise NumericalError(f"step {self.step}: validation: {exc}; training stopped, {self._kept()}") from None
        better = bool(val) and val["loss"] < self.best
        if better:
            self.best = val["loss"]
        self.log(train, val)
        self.save(best=better)
        D.barrier()

    def train_step(self, batch) -> dict[str, float]:
        """One optimiser step; returns the loss parts as floats (for the logs).

        Raises:
            NumericalError: the loss is NaN or infinite (nothing is applied to the weights).
        """
        batch = batch.to(self.device, non_blocking=True)
        self._last_batch = batch[K.SAMPLE_INDEX]
        parts = self.model(batch)
        # The logs need the values anyway: reading them here, before backward, is the step's one
        # host sync (it was after the update) and lets a non-finite loss stop the run before it
        # turns the weights into NaN.
        values = dict(zip(parts, torch.stack([v.detach().double() for v in parts.values()]).tolist()))
        if not math.isfinite(values["loss"]):
            raise self._loss_error(values, batch)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if self.cfg.clip_grad and self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.schedule.step()
        if self.ema:
            self.ema.update()
        return values

    def _loss_error(self, values: dict[str, float], batch) -> NumericalError:
        bad = [f"{k} {v}" for k, v in values.items() if k != "loss" and not math.isfinite(v)]
        return NumericalError(
            f"step {self.step + 1}: the training loss is {values['loss']}"
            + (f" ({', '.join(bad)})" if bad else "")
            + f" on the batch of samples {batch[K.SAMPLE_INDEX].view(-1).tolist()} of {self.cfg.data}; "
            f"training stopped, {self._kept()}. Lower --lr or clip_grad (--config), or check those samples' labels")

    def fit(self, stop_after_steps: int | None = None) -> dict:
        """Train to ``total_steps`` (resuming from ``last.pt`` when there is one).

        Args:
            stop_after_steps: stop (as if killed, without saving) after this many steps of this
                call; for tests of resumption.
        """
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        D.barrier()
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # warn_only: an op without a deterministic kernel warns instead of stopping the run
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(stop_after_steps)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)

    def _fit(self, stop_after_steps: int | None) -> dict:
        cfg = self.cfg
        resumed = self.resume()
        if self.is_main:
            cfg.save(self.out / CONFIG_FILE)
            if resumed:
                self._trim_metrics()
        self._tb = None
        if self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self._tb = None
        self._t0 = time.perf_counter()
        self._sums, self._n = {}, 0
        done_here = 0
        bar = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        self.objective.train()
        # a resumed run that had already finished has nothing left to do
        last_validated = self.step if resumed else -1
        try:
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch)
                self.train_joined.set_epoch(self.epoch)
                loader = make_loader(self.train_joined, SkipBatches(self.sampler, self.batch_in_epoch),
                                     num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                     seed=cfg.seed + self.epoch)
                finished_epoch = True
                for batch in loader:
                    parts = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    done_here += 1
                    for k, v in parts.items():
                        self._sums[k] = self._sums.get(k, 0.0) + v
                    self._n += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{parts['loss']:.4g}", epoch=self.epoch)
                    if stop_after_steps is not None and done_here >= stop_after_steps:
                        return {"stopped": True, "step": self.step}
                    if self.step >= self.total_steps:
                        pass  # the final validation + checkpoint come after the loop
                    elif cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._checkpoint_point()
                        last_validated = self.step
                    elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                    if self.step >= self.total_steps:
                        finished_epoch = self.batch_in_epoch >= self.steps_per_epoch
                        break
                if finished_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
            if last_validated != self.step:
                self._checkpoint_point()
        finally:
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
        return {"stopped": False, "step": self.step, "best": self.best}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train(config: TrainConfig, **datasets) -> dict:
    """Build a :class:`Trainer` and run it (``kdcache train``)."""
    trainer = Trainer(config, **datasets)
    try:
        return trainer.fit()
    finally:
        D.cleanup()
