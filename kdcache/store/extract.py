"""Stage one: run a teacher once over a dataset and write its targets into a feature store.

Work is cut into the store's groups (whole shards). Each group is computed in batches that start
at the group's first sample, so its values do not depend on where a run started: a resumed run, a
multi-process run and an uninterrupted single run write the same bytes. Under ``torchrun`` each
rank takes a contiguous, shard-aligned range of groups; rank 0 creates the store, waits for every
group's marker and finishes the store.

What one group's values are comes from a *runner*: :class:`ModelRunner` batches samples through a
kdcache model; :class:`kdcache.teachers.calculator.CalculatorRunner` runs any ASE calculator on
each structure, in worker processes. Groups, markers, resume, lock and provenance are shared.

Every setting is a field of :class:`~kdcache.store.request.ExtractRequest`; those that decide
the values are the store's record (:class:`~kdcache.store.request.StoreRecord`), which a resume
must present unchanged.

One job writes a store at a time: rank 0 holds the store's write lock
(:mod:`kdcache.store.lock`) from before it creates or resumes the store until it is finished, and
a second ``kdcache extract`` on the same ``--out`` is refused with a message naming the holder.
"""

from __future__ import annotations

import datetime as _dt
import glob
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from kdcache import distributed as D
from kdcache import keys as K
from kdcache.data import open_dataset
from kdcache.data.sample import sample_hash
from kdcache.errors import ConfigError, DataError, StoreError
from kdcache.fs import ensure_output_folder, naming_output
from kdcache.store import format as F
from kdcache.store.lock import WriteLock
from kdcache.store.request import TEACHER_DTYPES, ExtractRequest, StoreRecord
from kdcache.store.request import check_settings  # noqa: F401  (kdcache.pipeline.backends imports it from here)
from kdcache.models.torchfile import weights_sha256
from kdcache.store.writer import PROGRESS_DIR, StoreWriter, remove_store

if TYPE_CHECKING:
    from kdcache.teachers.adapter import AdapterSpec
    from kdcache.teachers.calculator import CalculatorSpec

RANDOM_TEACHER_WARNING = (
    "RANDOMLY INITIALISED TEACHER: no checkpoint was given, so the stored targets come from "
    "untrained weights. Fine for a demo or a test; worthless for distillation."
)
#: config keys that describe the teacher's graph (recorded as "graph settings")
_GRAPH_WORDS = ("cutoff", "max_neighbors", "pbc", "otf_graph", "qint_tags", "enforce_max_neighbors")
#: defaults of :func:`extract`'s settings: the schema's
_DEFAULT = {name: f.default for name, f in ExtractRequest.model_fields.items()}


@dataclass
class Teacher:
    """A teacher model with everything provenance needs."""

    model: torch.nn.Module
    name: str
    config: dict
    checkpoint: str | None
    checkpoint_sha256: str | None
    weights_sha256: str
    preset: str | None = None
    seed: int | None = None
    extra: dict = field(default_factory=dict)
    #: store key -> module path of the features taken by forward hooks (kdcache.teachers.hooks)
    feature_modules: dict = field(default_factory=dict)

    def identity(self) -> dict:
        """What of the teacher decides the stored values (part of the store's request)."""
        d = {k: self.describe()[k] for k in ("name", "config", "checkpoint_sha256", "weights_sha256")}
        if self.checkpoint is None:
            d["seed"] = self.seed
        if self.feature_modules:  # absent otherwise: the records of earlier stores stay valid
            d["feature_modules"] = self.feature_modules
        return d

    @property
    def warnings(self) -> list[str]:
        return [RANDOM_TEACHER_WARNING] if self.checkpoint is None else []

    @property
    def graph(self) -> dict:
        """The teacher's graph settings (recorded as "graph")."""
        return {k: v for k, v in self.config.items() if any(w in k for w in _GRAPH_WORDS)}

    def describe(self) -> dict:
        d = {
            "name": self.name,
            "preset": self.preset,
            "config": self.config,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "weights_sha256": self.weights_sha256,
            "normalizer": self.model.normalizer.as_dict(),
            **self.extra,
        }
        if self.feature_modules:
            d["feature_modules"] = self.feature_modules
        if self.checkpoint is None:
            d["random_init"] = True
            d["seed"] = self.seed
            d["warning"] = RANDOM_TEACHER_WARNING
        return d


def _registry_name(teacher: str) -> str | None:
    """Registry name implied by a preset name (``gemnet-oc-tiny`` -> ``gemnet_oc``)."""
    from kdcache.models import MODEL_CLASSES

    t = teacher.lower().replace("-", "_")
    for reg in sorted(MODEL_CLASSES, key=len, reverse=True):
        if t == reg or t.startswith(reg + "_"):
            return reg
    return None


def load_teacher(teacher: str | None, checkpoint: str | None, device: torch.device, seed: int = 0) -> Teacher:
    """Resolve ``--teacher``/``--checkpoint``: a checkpoint's own model configuration always wins
    over a preset; a preset without a checkpoint is randomly initialised (with a loud warning).

    Args:
        teacher: preset name (``gemnet-oc``, ``painn-big``, ``schnet-tiny``, ...) or None.
        checkpoint: checkpoint file or None.
        device: where to run.
        seed: initialisation seed of a checkpoint-less teacher (kept for resume).
    """
    if checkpoint is None and teacher is None:
        raise ConfigError("extract needs --checkpoint (a trained teacher) and/or --teacher (a preset name)")
    if checkpoint is not None:
        from kdcache.models.checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint, device=device)
        if teacher is not None:
            implied = _registry_name(teacher)
            if implied is not None and implied != loaded.name:
                raise ConfigError(
                    f"--teacher {teacher!r} is a {implied} model but checkpoint {checkpoint} holds a {loaded.name} model"
                )
        return Teacher(
            model=loaded.model,
            name=loaded.name,
            config=F.jsonable(loaded.config),
            checkpoint=str(Path(checkpoint).resolve()),
            checkpoint_sha256=loaded.sha256,
            weights_sha256=weights_sha256(loaded.model),
            preset=teacher,
            extra={"checkpoint_format": loaded.source_format, "used_ema": loaded.used_ema},
        )
    from kdcache.models.presets import build_preset

    torch.manual_seed(seed)
    try:
        model = build_preset(teacher)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"unknown teacher preset {teacher!r}: {exc}") from exc
    model = model.to(device).eval()
    print(f"WARNING: {RANDOM_TEACHER_WARNING}", file=sys.stderr)
    return Teacher(
        model=model,
        name=model.name,
        config=F.jsonable(model.config),
        checkpoint=None,
        checkpoint_sha256=None,
        weights_sha256=weights_sha256(model),
        preset=teacher,
        seed=seed,
    )


def resolve_features(model, features: Sequence[str] | None) -> tuple[list[str], bool]:
    """(per-atom keys to store, whether energies/forces are stored) for ``--features``.

    Args:
        model: the teacher model (its ``available_features``; an adapter's ``offers_atom_energy``
            and the ``hooked_features`` of :class:`kdcache.teachers.hooks.HookedTeacher`, which
            are stored whatever ``features`` says).
        features: the request's ``features`` (checked names; None: all the model offers).

    Raises:
        ConfigError: a feature the model cannot give, or nothing per atom selected.
    """
    offered = [k for k in F.HIDDEN_KEYS if k in model.available_features]
    labels = [K.ATOM_ENERGY, F.OUTPUTS] if getattr(model, "offers_atom_energy", True) else [F.OUTPUTS]
    hooked = list(getattr(model, "hooked_features", ()))
    wanted = [*offered, *labels] if features is None else list(dict.fromkeys([*features, *hooked]))
    lacking = [f for f in wanted if f not in offered + labels]
    if lacking:
        hint = ""
        if K.VECTOR in offered and (K.E2V in lacking or K.E2N in lacking):
            hint = " (a PaiNN teacher's v2v target is its own 'vector' feature)"
        raise ConfigError(f"teacher {model.name!r} cannot give {lacking}: it offers {offered + labels}{hint}")
    keys = [k for k in F.PER_ATOM_KEYS if k in wanted or (k == K.FORCES and F.OUTPUTS in wanted)]
    if not keys:
        raise ConfigError("--features selects nothing per atom; name at least one of node, e2n, e2v, vector, atom_energy, outputs")
    return keys, F.OUTPUTS in wanted


def set_teacher_dtype(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Run the teacher in ``dtype`` (float32 unless asked otherwise, whatever the checkpoint
    stored); the label normaliser stays float64 so that large energy means keep their digits."""
    if dtype not in TEACHER_DTYPES:
        raise ConfigError(f"--teacher-dtype {dtype!r}: choose float32 or float64")
    model.to(getattr(torch, dtype))
    if hasattr(model, "normalizer"):
        model.normalizer.double()
    return model


def _batch_to(batch, dev: torch.device, dtype: str):
    batch = batch.to(dev)
    want = getattr(torch, dtype)
    for key in (K.POSITIONS, K.CELL):
        if key in batch and batch[key].is_floating_point() and batch[key].dtype != want:
            batch[key] = batch[key].to(want)
    return batch


class ModelRunner:
    """Computes a model teacher's values for lists of samples, ``batch_size`` per forward.

    Every runner (this one, :class:`kdcache.teachers.calculator.CalculatorRunner`) offers the
    same: ``keys`` (per-atom store keys), ``has_energy``, ``batch_size`` (samples per call; None:
    a whole group), ``value_settings`` (the :class:`ExtractRequest` fields besides the teacher
    that decide its values), ``row_shapes(dataset)``, and a call ``(items, ids, advance) ->
    {key: tensor, "energy": [S]}`` that calls ``advance(k)`` as samples are done; and it is a
    context manager.

    With ``hessian_probes`` K > 0 it also gives ``hvp [N, 3, K]``, the products of the teacher's
    force Jacobian with each sample's probes (:mod:`kdcache.hessian`), in eV/Å².

    Args:
        teacher: the model teacher.
        request: the extraction's settings (``features``, ``teacher_dtype``, ``batch_size``,
            ``hessian_probes``, ``fast``).
        dataset: where the samples come from.
        dev: where the model runs.

    Raises:
        ConfigError: ``hessian_probes`` for a teacher that predicts no forces.
    """

    #: batches decide the values (a batch's sums), so a resume must batch the same way
    value_settings = ("batch_size", "teacher_dtype")

    def __init__(self, teacher: Teacher, request: ExtractRequest, dataset, dev: torch.device):
        self.model = set_teacher_dtype(teacher.model, request.teacher_dtype)
        for p in self.model.parameters():  # forces may need autograd w.r.t. positions, never w.r.t. weights
            p.requires_grad_(False)
        self.keys, self.has_energy = resolve_features(self.model, request.features)
        self.hidden = [k for k in self.keys if k in F.HIDDEN_KEYS]
        self.dataset, self.dev = dataset, dev
        self.teacher_dtype, self.batch_size = request.teacher_dtype, request.batch_size
        self.hessian_probes = request.hessian_probes
        if self.hessian_probes:
            if not getattr(self.model, "regress_forces", False):
                raise ConfigError(f"--hessian-probes: teacher {self.model.name!r} predicts no forces to differentiate")
            self.keys = [*self.keys, K.HVP]
            self.value_settings = (*type(self).value_settings, "hessian_probes")
        self.fast_decision = self._decide_fast(request)
        self.fast = self.fast_decision.fast  # what the store's record says (ExtractRequest.fast)
        if self.fast:
            from kdcache.models.fast import fast_model  # torch.compile only for those who ask for it

            try:
                self.model = fast_model(self.model)
            except TypeError as exc:
                raise ConfigError(f"--fast: {exc} (the compiled path is for kdcache's built-in models)") from None
            self.value_settings = (*self.value_settings, "fast")

    def _decide_fast(self, request: ExtractRequest):
        """Resolve ``fast`` (:mod:`kdcache.models.fast_auto`): ``auto`` keeps what an existing
        store (being resumed) records, else weighs one timed eager batch of the first samples
        against the job's batches; rank 0 decides for every rank."""
        return D.rank0_result(lambda: self._weigh_fast(request), "decide the fast path")

    def _weigh_fast(self, request: ExtractRequest):
        """:meth:`_decide_fast` on rank 0."""
        from kdcache.data.batch import collate
        from kdcache.models.fast_auto import AUTO, FastDecision, decide_fast, eager_batch_seconds

        if request.fast == AUTO and not request.overwrite and (Path(request.out) / "zarr.json").is_file():
            try:
                kept = StoreWriter.open(request.out).attrs.get("request", {}).get("fast") is True
            except StoreError:
                kept = None  # not a store kdcache can resume: its own check says so later
            if kept is not None:
                return FastDecision(kept, f"auto: kept from the store {request.out}")
        cannot = ("--hessian-probes differentiates the forces again" if self.hessian_probes else
                  "--feature hooks modules of the eager model" if request.feature_modules else None)
        world = max(1, D.env_world()[1])
        batches = -(-request.num_samples(len(self.dataset)) // (self.batch_size * world))

        def time_batch() -> float:
            items = [self.dataset[i] for i in range(min(self.batch_size, len(self.dataset)))]
            batch = _batch_to(collate(items, self.dataset), self.dev, self.teacher_dtype)
            return eager_batch_seconds(lambda: self.model.predict(batch, self.hidden), self.dev)

        return decide_fast(request.fast, self.model, "inference", batches, self.dev, time_batch, cannot)

    def __enter__(self) -> "ModelRunner":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def row_shapes(self, dataset) -> dict[str, tuple]:
        """One forward on the first sample tells the feature widths."""
        probe = self([dataset[0]], [0], lambda k: None)
        return {k: tuple(probe[k].shape[1:]) for k in self.keys}

    def __call__(self, items: list, ids, advance) -> dict:
        from kdcache.data.batch import collate

        batch = _batch_to(collate(items, self.dataset), self.dev, self.teacher_dtype)  # labels not needed
        if not self.hessian_probes:
            pred = self.model.predict(batch, self.hidden)
        else:
            pred = self._with_products(batch, ids)
        advance(len(items))
        return pred

    def _with_products(self, batch, ids) -> dict:
        """:meth:`PotentialModel.predict` plus ``hvp``: positions that require grad make the model
        keep the forces' graph (``create_graph``), which the products then differentiate."""
        from kdcache.hessian import batch_probes, force_jacobian_products

        pos = batch[K.POSITIONS].detach().requires_grad_(True)
        batch[K.POSITIONS] = pos
        # drawn on the CPU from the store's sample indices (= dataset indices), as stage two does
        probes = batch_probes(list(ids), batch[K.NATOMS].tolist(), self.hessian_probes,
                               getattr(batch, K.FIXED, None))
        with torch.enable_grad():
            pred = self.model.predict(batch, self.hidden)
            # (a model that does not say how it makes forces gets the general, non-symmetric product)
            symmetric = bool(getattr(self.model, "gradient_forces", False))
            pred[K.HVP] = force_jacobian_products(pred[K.FORCES], pos, probes.to(pos), symmetric)
        return {k: v.detach() for k, v in pred.items()}


def resolve_teacher(request: ExtractRequest, dataset, dev: torch.device):
    """The teacher and its runner for the request's ``teacher``/``checkpoint``/``feature_modules``.

    A teacher that is code to import, an ASE calculator (``ase:...``) or an adapter module
    (``py:...``), is accepted only as an object (a
    :class:`~kdcache.teachers.calculator.CalculatorSpec` or
    :class:`~kdcache.teachers.adapter.AdapterSpec`: what ``kdcache extract --teacher`` parses),
    never as a string: a string reaches here also from settings a user names implicitly (a
    pipeline recipe's ``teacher.preset``), and such a spec imports and runs the module it names
    (see :mod:`kdcache.teachers.spec`).

    Args:
        request: the extraction's settings (``teacher``, ``checkpoint``, ``seed``, ``workers``,
            ``feature_modules`` and what the runner uses).
        dataset: the dataset.
        dev: where a model runs.

    Raises:
        ConfigError: a calculator or adapter spec given as a string, a calculator or adapter
            with a checkpoint, ``--workers`` with a model teacher, ``--feature`` with a
            calculator, or a ``--feature`` module path the teacher lacks.
    """
    from kdcache.teachers.adapter import AdapterSpec, AdapterTeacher, is_adapter_spec
    from kdcache.teachers.calculator import CalculatorSpec, CalculatorTeacher, is_calculator_spec
    from kdcache.teachers.hooks import hook_features

    teacher, checkpoint = request.teacher, request.checkpoint
    if isinstance(teacher, CalculatorSpec):
        if checkpoint is not None:
            raise ConfigError(f"--teacher {teacher.name} is an ASE calculator; it takes no --checkpoint")
        if request.feature_modules:
            raise ConfigError(f"--feature takes a module of a torch teacher; --teacher {teacher.name} is an ASE "
                              "calculator, which has none")
        calc = CalculatorTeacher(teacher)
        return calc, calc.runner(request.features, dataset, request.workers)
    for is_spec, kind, form, cls in ((is_calculator_spec, "an ASE calculator", "ase:MODULE:FACTORY", CalculatorSpec),
                                     (is_adapter_spec, "an adapter", "py:MODULE:FUNCTION", AdapterSpec)):
        if is_spec(teacher):
            raise ConfigError(
                f"teacher {teacher!r}: {kind} teacher imports and runs the module it names, so it is taken only "
                f"from the command line (`kdcache extract --teacher {form}`), or in Python as "
                f"{cls.__module__}.{cls.__name__}; not from a recipe or another setting")
    if request.workers != 1:
        raise ConfigError("--workers is for ASE calculator teachers (--teacher ase:...); a model teacher runs "
                          "batches in one process per device (several GPUs: torchrun)")
    if isinstance(teacher, AdapterSpec):
        if checkpoint is not None:
            raise ConfigError(f"--teacher {teacher.name} is an adapter; it takes no --checkpoint: load the weights in "
                              f"{teacher.function}, e.g. from a path among its keyword arguments")
        model_teacher = AdapterTeacher(teacher, dev)
    else:
        model_teacher = load_teacher(teacher, checkpoint, dev, seed=request.seed)
    hook_features(model_teacher, request.feature_modules)
    return model_teacher, ModelRunner(model_teacher, request, dataset, dev)


@dataclass
class ExtractResult:
    path: str
    num_samples: int
    groups_written: int
    seconds_total: float
    seconds_forward: float  # data loading + teacher forward + conversion
    seconds_write: float  # shard + marker writes (in the writer thread)
    resumed: bool
    rank: int = 0
    world_size: int = 1
    seconds_waiting_for_writes: float = 0.0  # time the forward loop stood still for the writer

    @property
    def write_share(self) -> float:
        """Writing's share of the extraction's time: the time the loop waited for writes."""
        busy = self.seconds_forward + self.seconds_waiting_for_writes
        return self.seconds_waiting_for_writes / busy if busy else 0.0

    @property
    def write_share_unoverlapped(self) -> float:
        """The share writing would take if it did not overlap the forward (write thread time)."""
        busy = self.seconds_forward + self.seconds_write
        return self.seconds_write / busy if busy else 0.0


def extract(
    data: str | os.PathLike,
    out: str | os.PathLike,
    teacher: str | CalculatorSpec | AdapterSpec | None = None,
    checkpoint: str | None = None,
    features: Sequence[str] | None = None,
    dtype: str = _DEFAULT["dtype"],
    label_dtype: str = _DEFAULT["label_dtype"],
    codec: str = _DEFAULT["codec"],
    batch_size: int = _DEFAULT["batch_size"],
    device: str | None = None,
    limit: int | None = None,
    shard_atoms: int = _DEFAULT["shard_atoms"],
    chunk_atoms: int = _DEFAULT["chunk_atoms"],
    overwrite: bool = _DEFAULT["overwrite"],
    seed: int = _DEFAULT["seed"],
    progress: bool = _DEFAULT["progress"],
    teacher_dtype: str = _DEFAULT["teacher_dtype"],
    workers: int = _DEFAULT["workers"],
    hessian_probes: int = _DEFAULT["hessian_probes"],
    fast: bool | str = _DEFAULT["fast"],
    feature_modules: Mapping[str, str] | Sequence[str] | None = None,
) -> ExtractResult:
    """Run ``teacher`` over ``data`` into the store ``out`` (create, resume, or refuse).

    Each argument is the :class:`~kdcache.store.request.ExtractRequest` field of its name,
    with its default (the field's description says what it does; ``kdcache extract --help``
    prints them).

    Args:
        data: dataset path (anything :func:`kdcache.data.open_dataset` reads).
        out: store folder (``*.zarr``).
        teacher: preset name, or an ASE calculator as a
            :class:`~kdcache.teachers.calculator.CalculatorSpec`, or an adapter module as a
            :class:`~kdcache.teachers.adapter.AdapterSpec` (a string of those is refused, see
            :func:`resolve_teacher`); optional when ``checkpoint`` names its model.
        checkpoint: teacher checkpoint (its configuration wins over the preset's).
        features, dtype, label_dtype, codec, batch_size, device, limit, shard_atoms,
            chunk_atoms, overwrite, seed, progress, teacher_dtype, workers, hessian_probes, fast,
            feature_modules: see :class:`~kdcache.store.request.ExtractRequest`.

    Raises:
        ConfigError: a setting no store can be made with (before any work).
    """
    request = ExtractRequest.of(
        data=data, out=out, teacher=teacher, checkpoint=checkpoint, features=features, dtype=dtype,
        label_dtype=label_dtype, codec=codec, batch_size=batch_size, device=device, limit=limit,
        shard_atoms=shard_atoms, chunk_atoms=chunk_atoms, overwrite=overwrite, seed=seed, progress=progress,
        teacher_dtype=teacher_dtype, workers=workers, hessian_probes=hessian_probes, fast=fast,
        feature_modules=feature_modules)
    return run_extract(request)


def run_extract(request: ExtractRequest) -> ExtractResult:
    """Run one extraction (see :func:`extract`): on every rank under ``torchrun``.

    Args:
        request: every setting of the run.
    """
    t_start = time.perf_counter()
    out = ensure_output_folder(request.out)
    # this process's GPU is chosen (and made current) before the first collective
    dev = D.pick_device(request.device)
    if dev.type == "cuda":
        # GPU scatter-adds use atomics (order-dependent sums); deterministic kernels make a
        # resumed or multi-GPU run write the same bits as an uninterrupted one
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # hours: rank 0 waits at the end for the slowest rank's last groups
    rank, world_size = D.setup(dev, timeout=_dt.timedelta(hours=12))
    lock = WriteLock(out)
    try:
        with naming_output(out):
            # one writer per store: rank 0 holds the lock for the whole job (module docstring
            # of kdcache.store.lock); the other ranks start only once it has it
            _on_rank0(rank, "lock", out, lambda: _lock_and_clean(lock, out))
            return _extract(_Job.start(request, out, dev, rank, world_size, t_start))
    finally:
        lock.release()
        D.cleanup()


def _on_rank0(rank: int, what: str, out: Path, fn):
    """Run ``fn`` on rank 0 and give its (picklable) result to every rank; a failure on rank 0
    is raised on every rank, so that none waits forever for a rank that gave up.

    Args:
        rank: this process's rank.
        what: what ``fn`` does, for the other ranks' message (``"prepare"``).
        out: the store.
        fn: the work, called without arguments on rank 0 only.
    """
    status: dict[str, Any] = {"error": None, "result": None}
    failure = None
    if rank == 0:
        try:
            status["result"] = fn()
        except Exception as exc:
            failure = exc
            status["error"] = f"{type(exc).__name__}: {exc}"
    status = D.broadcast_object(status)
    if failure is not None:
        raise failure
    if status["error"]:
        raise StoreError(f"rank 0 could not {what} {out}: {status['error']}")
    return status["result"]


def _lock_and_clean(lock: WriteLock, out: Path) -> None:
    """Take the store's write lock, then remove what dead writers left behind: a store being
    created (``.NAME.creating-PID``) and temporary shard and marker files. Only a lock holder
    may, since a live writer's temporary files look just the same."""
    lock.acquire()
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.creating-*"):
        remove_store(tmp)
    if (out / "zarr.json").is_file():
        for tmp in out.rglob("*.partial"):  # shard files being written (kdcache's and zarr's)
            tmp.unlink(missing_ok=True)
        for tmp in (out / PROGRESS_DIR).glob("*.tmp"):  # group markers being written
            tmp.unlink(missing_ok=True)


@dataclass
class _Job:
    """One rank's extraction: the request, where it runs, the dataset, the teacher and its runner."""

    request: ExtractRequest
    out: Path
    dev: torch.device
    rank: int
    world_size: int
    t_start: float
    dataset: Any
    num_samples: int
    teacher: Any
    runner: Any
    record: StoreRecord

    @classmethod
    def start(cls, request: ExtractRequest, out: Path, dev: torch.device, rank: int, world_size: int,
              t_start: float) -> "_Job":
        """Open the dataset, resolve the teacher and make the store's record.

        Args:
            request: the settings.
            out: the store (checked folder).
            dev: where a model runs.
            rank, world_size: this process among the job's.
            t_start: when the run began (``time.perf_counter``).
        """
        dataset = open_dataset(request.data)
        n = request.num_samples(len(dataset))
        teacher, runner = resolve_teacher(request, dataset, dev)
        decision = getattr(runner, "fast_decision", None)
        if decision is not None:  # a model teacher: the store records what `fast` resolved to
            from kdcache.models.fast_auto import AUTO

            if request.fast == AUTO and rank == 0 and not decision.quiet:
                print(f"extract: {decision.describe()}", file=sys.stderr)
            request = request.model_copy(update={"fast": decision.fast})
        record = request.store_record(teacher.identity(), F.jsonable(dataset.fingerprint()), n, runner.keys,
                                      runner.has_energy, runner.value_settings)
        return cls(request, out, dev, rank, world_size, t_start, dataset, n, teacher, runner, record)

    @property
    def dtypes(self) -> dict[str, str]:
        """Logical dtype of each stored key (the record's)."""
        return self.record.dtypes

    def result(self, num_samples: int, groups: int, resumed: bool, timing: "_Writes | None" = None) -> ExtractResult:
        """What this rank did: ``groups`` written (with ``timing``'s seconds) of a store of ``num_samples``."""
        t = timing or _Writes.idle()
        return ExtractResult(str(self.out), num_samples, groups, time.perf_counter() - self.t_start, t.seconds_forward,
                             t.seconds_write, resumed, self.rank, self.world_size, t.seconds_blocked)


def _extract(job: _Job) -> ExtractResult:
    """Create, resume or refuse the store (rank 0), then compute and write this rank's groups."""
    resumed = _on_rank0(job.rank, "prepare", job.out, lambda: _prepare_store(job))
    writer = StoreWriter.open(job.out)
    lay = writer.layout
    if writer.complete:
        if job.rank == 0:
            shutil.rmtree(writer.progress, ignore_errors=True)  # left by a kill right after finishing
            print(f"{job.out}: already complete ({lay.num_samples} samples); nothing to do", file=sys.stderr)
        return job.result(lay.num_samples, 0, True)
    mine = lay.rank_groups(job.rank, job.world_size)
    todo = [g for g in mine if g not in writer.done_groups()]
    bar = None
    if job.request.progress and job.rank == 0:
        from tqdm import tqdm

        n_mine = sum(len(lay.group_samples(g)) for g in mine)
        bar = tqdm(total=n_mine, initial=n_mine - sum(len(lay.group_samples(g)) for g in todo), unit="sample",
                   desc=f"extract {job.teacher.name}", file=sys.stderr, mininterval=0.5, smoothing=0.1)
    writes = _Writes(writer, record_ranges=job.rank == 0 and job.world_size == 1, bar=bar)
    advance = bar.update if bar is not None else (lambda k: None)
    try:
        with job.runner:  # a calculator's worker processes live while groups are computed
            for g in todo:
                t0 = time.perf_counter()
                rows, energy, hashes = _compute_group(job, writer, g, advance)
                writes.seconds_forward += time.perf_counter() - t0
                writes.submit(g, rows, energy, hashes)
            writes.settle()
    finally:
        writes.close()
    if bar is not None:
        bar.close()
    if job.rank == 0:
        _finish(job, writer, writes)
    return job.result(lay.num_samples, len(todo), bool(resumed), writes)


def _compute_group(job: _Job, writer: StoreWriter, g: int, advance) -> tuple[dict, np.ndarray, np.ndarray]:
    """Group ``g``'s rows (whole shards, in the storage dtypes), energies and sample hashes,
    computed in batches that start at the group's first sample."""
    lay, keys, dtypes = writer.layout, job.runner.keys, job.dtypes
    lo, hi = lay.group_atoms(g)
    rows = {k: np.zeros((hi - lo, *writer.root[k].shape[1:]), dtype=F.storage_dtype(dtypes[k])) for k in keys}
    samples = lay.group_samples(g)
    energy = np.zeros(len(samples), dtype=np.float64)
    hashes = np.zeros(len(samples), dtype=np.uint64)
    step = job.runner.batch_size or len(samples)
    for b0 in range(samples.start, samples.stop, step):
        ids = range(b0, min(b0 + step, samples.stop))
        items = [_laid_out_sample(job, lay, i) for i in ids]
        hashes[ids.start - samples.start : ids.stop - samples.start] = [
            np.int64(sample_hash(item)).view(np.uint64) for item in items]
        pred = job.runner(items, ids, advance)
        a = int(lay.atom_start[ids.start]) - lo
        b = a + int(lay.natoms[ids.start : ids.stop].sum())
        for k in keys:
            rows[k][a:b] = F.to_storage(pred[k], dtypes[k])
        if job.runner.has_energy:  # without outputs the store's energies are never read (no "energy" key)
            energy[ids.start - samples.start : ids.stop - samples.start] = pred[K.ENERGY].detach().double().cpu().numpy()
    return rows, energy, hashes


def _laid_out_sample(job: _Job, lay: F.Layout, i: int):
    """Sample ``i``, refused when its size is not the one the store was laid out for."""
    item = job.dataset[i]
    if int(item[K.POSITIONS].shape[0]) != int(lay.natoms[i]):
        raise DataError(job.request.data, i, K.POSITIONS, f"has {item[K.POSITIONS].shape[0]} atoms but the store "
                        f"was laid out for {int(lay.natoms[i])}: the dataset changed; use --overwrite")
    return item


class _Writes:
    """Group writes in one background thread, overlapping the next group's forward. At most one
    group waits, so memory stays at two groups' buffers; a group's marker is written after its
    shards, by the same task, so a kill at any moment leaves no marker without data.

    Args:
        writer: the store.
        record_ranges: record the ranges written so far in the attributes (a single process).
        bar: the progress bar (shows the share of time spent waiting for writes), or None.
    """

    def __init__(self, writer: StoreWriter | None, record_ranges: bool = False, bar=None):
        self.writer, self.record_ranges, self.bar = writer, record_ranges, bar
        self.done = writer.done_groups() if writer is not None else set()
        self.seconds_forward = self.seconds_write = self.seconds_blocked = 0.0
        self.pending: tuple[int, Future] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-store-write") if writer else None

    @classmethod
    def idle(cls) -> "_Writes":
        """No writes (a store that was already complete)."""
        return cls(None)

    def _write(self, g: int, rows: dict, energy: np.ndarray, hashes: np.ndarray) -> float:
        t = time.perf_counter()
        self.writer.write_group(g, rows, energy, hashes)
        return time.perf_counter() - t

    def submit(self, g: int, rows: dict, energy: np.ndarray, hashes: np.ndarray) -> None:
        """Write group ``g`` in the background, once the previous group's write is done."""
        self.settle()
        self.pending = (g, self.pool.submit(self._write, g, rows, energy, hashes))

    def settle(self) -> None:
        """Wait for the write in flight (its errors are raised here)."""
        if self.pending is None:
            return
        g, fut = self.pending
        t = time.perf_counter()
        self.seconds_write += fut.result()
        self.seconds_blocked += time.perf_counter() - t
        self.pending = None
        self.done.add(g)
        if self.record_ranges:
            self.writer.record_partial_ranges(self.done)  # informational (`kdcache store info`)
        if self.bar is not None:
            share = 100 * self.seconds_blocked / max(self.seconds_forward + self.seconds_blocked, 1e-9)
            self.bar.set_postfix_str(f"write {share:.1f}%", refresh=False)

    def close(self) -> None:
        """Stop the thread; after an error in a forward, the write in flight still finishes cleanly."""
        if self.pending is not None:
            self.pending[1].exception()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _finish(job: _Job, writer: StoreWriter, writes: _Writes) -> None:
    """Rank 0: wait for every group's marker, then mark the store complete."""
    while writer.missing_groups():  # other ranks are still writing their shards
        time.sleep(0.5)
    writer.finalize(extra={"extraction": {
        "world_size": job.world_size,
        "device": str(job.dev),
        "rank0_seconds_forward": round(writes.seconds_forward, 3),
        "rank0_seconds_write": round(writes.seconds_write, 3),
        "rank0_seconds_waiting_for_writes": round(writes.seconds_blocked, 3),
        "rank0_seconds_total": round(time.perf_counter() - job.t_start, 3),
    }})


def _prepare_store(job: _Job) -> bool:
    """Create the store, or check an existing one can be resumed. Returns True when resuming."""
    out, request = job.out, job.request
    # an empty folder (made by hand, or by a scheduler) is a store yet to be created: the
    # rename below may replace it
    exists = out.exists() and any(out.iterdir())
    if exists and not request.overwrite:
        StoreWriter.open(out).check_request(job.record.as_attrs())
        return True
    if exists:
        if not (out / "zarr.json").is_file():
            raise StoreError(f"{out} is a folder but not a feature store; --overwrite replaces only stores: "
                             "remove it yourself or choose another --out")
        remove_store(out)
    if job.num_samples == 0:
        raise ConfigError(f"{job.dataset!r} has no samples to extract")
    row_shapes = job.runner.row_shapes(job.dataset)
    natoms = job.dataset.atom_counts(job.num_samples, progress=request.progress)
    # A dataset smaller than one shard gets one shard of its own size: padding a few thousand
    # atoms out to 64 k would make small stores mostly zeros on disk.
    chunk = request.chunk_atoms
    needed = -(-int(np.sum(natoms)) // chunk) * chunk
    layout = F.Layout.plan(natoms, shard_atoms=min(request.shard_atoms, max(needed, chunk)), chunk_atoms=chunk)
    provenance = {
        "teacher": job.teacher.describe(),
        "dataset": {**job.record.dataset, "path": str(Path(job.dataset.path).resolve())},
        "graph": job.teacher.graph,
        "features": job.runner.keys,
        "has_energy": job.runner.has_energy,
        "warnings": list(job.teacher.warnings),
    }
    if getattr(job.runner, "hessian_probes", 0):  # how stage two regenerates the probes
        from kdcache.hessian import describe

        provenance["hessian"] = describe(job.runner.hessian_probes)
    # build the empty store beside its final place and rename it: a kill during creation leaves
    # no half-made store under the requested name
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    remove_store(tmp)
    StoreWriter.create(tmp, layout, np.arange(job.num_samples, dtype=np.int64), row_shapes, job.dtypes,
                       job.record.as_attrs(), provenance, codec=request.codec)
    os.rename(tmp, out)
    return False
