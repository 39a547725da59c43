"""Stage one: run a teacher once over a dataset and write its targets into a feature store.

Work is cut into the store's groups (whole shards). Each group is computed in batches that start
at the group's first sample, so its values do not depend on where a run started: a resumed run, a
multi-process run and an uninterrupted single run write the same bytes. Under ``torchrun`` each
rank takes a contiguous, shard-aligned range of groups; rank 0 creates the store, waits for every
group's marker and finishes the store.

What one group's values are comes from a *runner*: :class:`ModelRunner` batches samples through a
kdcache model; :class:`kdcache.teachers.calculator.CalculatorRunner` runs any ASE calculator on
each structure, in worker processes. Groups, markers, resume, lock and provenance are shared.

One job writes a store at a time: rank 0 holds the store's write lock
(:mod:`kdcache.store.lock`) from before it creates or resumes the store until it is finished, and
a second ``kdcache extract`` on the same ``--out`` is refused with a message naming the holder.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from kdcache import distributed as D
from kdcache import keys as K
from kdcache.errors import ConfigError, DataError, StoreError
from kdcache.fs import ensure_output_folder, naming_output
from kdcache.store import format as F
from kdcache.store.lock import WriteLock
from kdcache.store.writer import PROGRESS_DIR, StoreWriter, jsonable, remove_store

if TYPE_CHECKING:
    from kdcache.teachers.calculator import CalculatorSpec

RANDOM_TEACHER_WARNING = (
    "RANDOMLY INITIALISED TEACHER: no checkpoint was given, so the stored targets come from "
    "untrained weights. Fine for a demo or a test; worthless for distillation."
)
#: the precisions a teacher model runs in (``--teacher-dtype``)
TEACHER_DTYPES = ("float32", "float64")
#: config keys that describe the teacher's graph (recorded as "graph settings")
_GRAPH_WORDS = ("cutoff", "max_neighbors", "pbc", "otf_graph", "qint_tags", "enforce_max_neighbors")


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

    def identity(self) -> dict:
        """What of the teacher decides the stored values (part of the store's request)."""
        d = {k: self.describe()[k] for k in ("name", "config", "checkpoint_sha256", "weights_sha256")}
        if self.checkpoint is None:
            d["seed"] = self.seed
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
        if self.checkpoint is None:
            d["random_init"] = True
            d["seed"] = self.seed
            d["warning"] = RANDOM_TEACHER_WARNING
        return d


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes and bytes), independent of device."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
            config=jsonable(loaded.config),
            checkpoint=str(Path(checkpoint).resolve()),
            checkpoint_sha256=loaded.sha256,
            weights_sha256=weights_sha256(loaded.model),
            preset=teacher,
            extra={"checkpoint_format": loaded.source_format, "used_ema": loaded.used_ema},
        )
    try:
        from kdcache.models.presets import build_preset
    except ImportError as exc:  # pragma: no cover - presets are part of the package
        raise ConfigError(f"model presets are unavailable ({exc}); pass --checkpoint") from exc
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
        config=jsonable(model.config),
        checkpoint=None,
        checkpoint_sha256=None,
        weights_sha256=weights_sha256(model),
        preset=teacher,
        seed=seed,
    )


def resolve_features(model, features: Sequence[str] | None) -> tuple[list[str], bool]:
    """(per-atom keys to store, whether energies/forces are stored) for ``--features``."""
    offered = [k for k in F.HIDDEN_KEYS if k in getattr(model, "available_features", ())]
    if features is None:
        wanted = [*offered, K.ATOM_ENERGY, F.OUTPUTS]
    else:
        wanted = [f.strip() for f in features if f.strip()]
    unknown = [f for f in wanted if f not in F.FEATURE_CHOICES]
    if unknown:
        raise ConfigError(f"unknown feature(s) {unknown}; choose from {list(F.FEATURE_CHOICES)}")
    lacking = [f for f in wanted if f in F.HIDDEN_KEYS and f not in offered]
    if lacking:
        hint = ""
        if K.VECTOR in offered and (K.E2V in lacking or K.E2N in lacking):
            hint = " (a PaiNN teacher's v2v target is its own 'vector' feature)"
        raise ConfigError(f"teacher {model.name!r} cannot give {lacking}: it offers {offered + [K.ATOM_ENERGY, F.OUTPUTS]}{hint}")
    keys = [k for k in F.PER_ATOM_KEYS if k in wanted or (k == K.FORCES and F.OUTPUTS in wanted)]
    if not keys:
        raise ConfigError("--features selects nothing per atom; name at least one of node, e2n, e2v, vector, atom_energy, outputs")
    return keys, F.OUTPUTS in wanted


def open_data(path: str | os.PathLike):
    """The dataset at ``path`` (through :func:`kdcache.data.open_dataset`)."""
    from kdcache import data as kdata

    if hasattr(kdata, "open_dataset"):
        return kdata.open_dataset(path)
    # the dataset front door is being written; use the concrete readers meanwhile
    p = Path(path)
    if p.suffix == ".lmdb" or (p.is_dir() and any(p.glob("*.lmdb"))):
        from kdcache.data.lmdb_dataset import LmdbDataset

        return LmdbDataset(p)
    from kdcache.data.coll import AseDataset

    return AseDataset(p)


def _sample_hash(data) -> int:
    from kdcache.data.sample import sample_hash

    return sample_hash(data)


def dataset_natoms(dataset, n: int, progress: bool = False) -> np.ndarray:
    """Atoms of the first ``n`` samples (needed up front to lay out the shards)."""
    fast = getattr(dataset, "natoms_array", None)
    if callable(fast):
        return np.asarray(fast(), dtype=np.int64)[:n]
    out = np.zeros(n, dtype=np.int64)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="planning", unit="sample", file=sys.stderr, mininterval=1.0)
    for i in it:
        out[i] = int(dataset[i][K.POSITIONS].shape[0])
    return out


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
    a whole group), ``request`` (settings besides the teacher that decide the values),
    ``row_shapes(dataset)``, and a call ``(items, ids, advance) -> {key: tensor, "energy": [S]}``
    that calls ``advance(k)`` as samples are done; and it is a context manager.

    Args:
        teacher: the model teacher.
        features: the ``--features`` choice (see :func:`resolve_features`).
        dataset: where the samples come from.
        dev: where the model runs.
        teacher_dtype: its precision.
        batch_size: samples per forward.
    """

    def __init__(self, teacher: Teacher, features, dataset, dev: torch.device, teacher_dtype: str, batch_size: int):
        self.model = set_teacher_dtype(teacher.model, teacher_dtype)
        for p in self.model.parameters():  # forces may need autograd w.r.t. positions, never w.r.t. weights
            p.requires_grad_(False)
        self.keys, self.has_energy = resolve_features(self.model, features)
        self.hidden = [k for k in self.keys if k in F.HIDDEN_KEYS]
        self.dataset, self.dev, self.teacher_dtype, self.batch_size = dataset, dev, teacher_dtype, batch_size
        # batches decide the values (a batch's sums), so a resume must batch the same way
        self.request = {"batch_size": batch_size, "teacher_dtype": teacher_dtype}

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
        pred = self.model.predict(batch, self.hidden)
        advance(len(items))
        return pred


def resolve_teacher(teacher, checkpoint: str | None, features, dataset, dev: torch.device, seed: int,
                    teacher_dtype: str, batch_size: int, workers: int):
    """The teacher and its runner for ``--teacher``/``--checkpoint``.

    A calculator teacher is accepted only as a
    :class:`~kdcache.teachers.calculator.CalculatorSpec` object (what ``kdcache extract
    --teacher ase:...`` parses), never as a string: a string reaches here also from settings a
    user names implicitly (a pipeline recipe's ``teacher.preset``), and a calculator spec imports
    and runs the module it names (see :mod:`kdcache.teachers.calculator`).

    Args:
        teacher: preset name, ``CalculatorSpec``, or None.
        checkpoint: model checkpoint, or None.
        features: the ``--features`` choice.
        dataset: the dataset.
        dev: where a model runs.
        seed: initialisation seed of a checkpoint-less model.
        teacher_dtype: a model's precision.
        batch_size: samples per model forward.
        workers: calculator processes (model teachers: 1).

    Raises:
        ConfigError: a calculator spec given as a string, a calculator with a checkpoint, or
            ``--workers`` with a model teacher.
    """
    from kdcache.teachers.calculator import CalculatorSpec, CalculatorTeacher, is_calculator_spec

    if isinstance(teacher, CalculatorSpec):
        if checkpoint is not None:
            raise ConfigError(f"--teacher {teacher.name} is an ASE calculator; it takes no --checkpoint")
        calc = CalculatorTeacher(teacher)
        return calc, calc.runner(features, dataset, workers)
    if is_calculator_spec(teacher):
        raise ConfigError(
            f"teacher {teacher!r}: an ASE calculator teacher imports and runs the module it names, so it is "
            "taken only from the command line (`kdcache extract --teacher ase:MODULE:FACTORY`), or in Python as "
            "kdcache.teachers.calculator.CalculatorSpec; not from a recipe or another setting")
    if int(workers) != 1:
        raise ConfigError("--workers is for ASE calculator teachers (--teacher ase:...); a model teacher runs "
                          "batches in one process per device (several GPUs: torchrun)")
    model_teacher = load_teacher(teacher, checkpoint, dev, seed=seed)
    return model_teacher, ModelRunner(model_teacher, features, dataset, dev, teacher_dtype, batch_size)


def _fingerprint(dataset, path) -> dict:
    fp = dataset.fingerprint() if hasattr(dataset, "fingerprint") else {"num_samples": len(dataset)}
    return jsonable(fp)


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


def _option_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def check_settings(settings: dict[str, Any], name=_option_name) -> None:
    """Refuse setting values no store can be made with, before any work: the one place their
    rules live, for :func:`extract` (the command line) and a recipe's ``store.options``
    (``kdcache pipeline validate``, before a teacher is trained).

    Args:
        settings: setting -> value, for any of ``dtype``, ``label_dtype``, ``teacher_dtype``,
            ``codec``, ``batch_size``, ``limit``, ``shard_atoms`` and ``chunk_atoms`` (other
            settings are not checked here). Where only one of ``shard_atoms`` and
            ``chunk_atoms`` is given, the other is its default for the rule that ties them.
        name: how a message names a setting (default: its option, ``--shard-atoms``).

    Raises:
        ConfigError: ``"<name(setting)>: <what is wrong>"``.
    """
    choices = {"dtype": F.FEATURE_DTYPES, "label_dtype": F.LABEL_DTYPES, "teacher_dtype": TEACHER_DTYPES,
               "codec": F.CODECS}
    for key, allowed in choices.items():
        if key in settings and settings[key] not in allowed:
            raise ConfigError(f"{name(key)}: {settings[key]!r} is not one of {', '.join(allowed)}")
    for key in ("batch_size", "limit", "shard_atoms", "chunk_atoms"):
        if settings.get(key) is not None and settings[key] <= 0:
            left_out = " (leave it out to store every sample)" if key == "limit" else ""
            raise ConfigError(f"{name(key)}: must be positive, got {settings[key]}{left_out}")
    if "shard_atoms" in settings or "chunk_atoms" in settings:
        # a shard file holds whole inner chunks (format.Layout.plan)
        shard = settings.get("shard_atoms", F.DEFAULT_SHARD_ATOMS)
        chunk = settings.get("chunk_atoms", F.DEFAULT_CHUNK_ATOMS)
        if shard % chunk:
            key = "shard_atoms" if "shard_atoms" in settings else "chunk_atoms"
            raise ConfigError(f"{name(key)}: shard_atoms ({shard}) must be a multiple of chunk_atoms ({chunk})")


def extract(
    data: str | os.PathLike,
    out: str | os.PathLike,
    teacher: str | CalculatorSpec | None = None,
    checkpoint: str | None = None,
    features: Sequence[str] | None = None,
    dtype: str = "float16",
    label_dtype: str = "float32",
    codec: str = "none",
    batch_size: int = 16,
    device: str | None = None,
    limit: int | None = None,
    shard_atoms: int = F.DEFAULT_SHARD_ATOMS,
    chunk_atoms: int = F.DEFAULT_CHUNK_ATOMS,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    teacher_dtype: str = "float32",
    workers: int = 1,
) -> ExtractResult:
    """Run ``teacher`` over ``data`` into the store ``out`` (create, resume, or refuse).

    Args:
        data: dataset path (anything :func:`kdcache.data.open_dataset` reads).
        out: store folder (``*.zarr``).
        teacher: preset name; optional when ``checkpoint`` names its model. Or an ASE
            calculator as a :class:`~kdcache.teachers.calculator.CalculatorSpec` (the command
            line's ``--teacher ase:MODULE:FACTORY[:JSON]``; a string is refused, see
            :func:`resolve_teacher`).
        checkpoint: teacher checkpoint (its configuration wins over the preset's).
        features: subset of ``node, e2n, e2v, vector, atom_energy, outputs`` (default: all the
            teacher offers; a calculator offers ``atom_energy`` where it gives per-atom energies,
            and ``outputs``).
        dtype: hidden-feature dtype: ``float16``, ``bfloat16`` or ``float32``.
        label_dtype: dtype of energies/per-atom energies/forces: ``float32`` or ``float64``.
        codec: ``none`` (default, fastest reads), ``zstd`` or ``blosc-lz4``.
        batch_size: samples per teacher forward (part of the store's identity: a resume must
            use the same, so that batches, and hence values, are the same). Not used by a
            calculator, which computes each structure on its own.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default ``cuda:LOCAL_RANK`` when CUDA exists.
        limit: store only the first ``limit`` samples.
        shard_atoms: atoms per shard (~64 k).
        chunk_atoms: atoms per inner chunk (64-256).
        overwrite: replace an existing store made with different settings (only a store: any
            other existing folder or file is refused, never deleted).
        seed: initialisation seed of a checkpoint-less (random) teacher.
        progress: show a progress bar (rank 0).
        teacher_dtype: dtype the teacher runs in (``float32``; ``float64`` for parity checks).
        workers: processes a calculator teacher runs in (default 1: this process); a resume may
            use another number, the values do not depend on it.
    """
    t_start = time.perf_counter()
    check_settings(dict(dtype=dtype, label_dtype=label_dtype, teacher_dtype=teacher_dtype, codec=codec,
                        batch_size=batch_size, limit=limit, shard_atoms=shard_atoms, chunk_atoms=chunk_atoms))
    out = ensure_output_folder(out)
    # this process's GPU is chosen (and made current) before the first collective
    dev = D.pick_device(device)
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
            return _extract(
                data, out, teacher, checkpoint, features, dtype, label_dtype, codec, batch_size, dev, limit,
                shard_atoms, chunk_atoms, overwrite, seed, progress, rank, world_size, t_start, teacher_dtype,
                workers,
            )
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


def _extract(data, out, teacher_name, checkpoint, features, dtype, label_dtype, codec, batch_size, dev, limit,
             shard_atoms, chunk_atoms, overwrite, seed, progress, rank, world_size, t_start,
             teacher_dtype, workers) -> ExtractResult:
    dataset = open_data(data)
    n_total = len(dataset)
    n = n_total if limit is None else max(0, min(int(limit), n_total))
    teacher, runner = resolve_teacher(teacher_name, checkpoint, features, dataset, dev, seed, teacher_dtype,
                                      batch_size, workers)
    keys, has_energy = runner.keys, runner.has_energy
    dtypes = {k: (dtype if k in F.HIDDEN_KEYS else label_dtype) for k in keys}
    dtypes[K.ENERGY] = label_dtype
    fingerprint = _fingerprint(dataset, data)
    request = {
        "teacher": teacher.identity(),
        "dataset": fingerprint,
        "num_samples": n,
        "features": keys,
        "outputs": has_energy,
        "dtypes": dtypes,
        "codec": codec,
        "shard_atoms": shard_atoms,
        "chunk_atoms": chunk_atoms,
        **runner.request,
    }

    # --- rank 0: create, resume or refuse; the others learn the outcome ---------------------
    resumed = _on_rank0(rank, "prepare", out, lambda: _prepare_store(
        out, request, overwrite, dataset, n, dtypes, teacher, runner, codec, shard_atoms, chunk_atoms, fingerprint,
        progress))

    writer = StoreWriter.open(out)
    lay = writer.layout
    if writer.complete:
        if rank == 0:
            import shutil

            shutil.rmtree(writer.progress, ignore_errors=True)  # left by a kill right after finishing
            print(f"{out}: already complete ({lay.num_samples} samples); nothing to do", file=sys.stderr)
        return ExtractResult(str(out), lay.num_samples, 0, time.perf_counter() - t_start, 0.0, 0.0, True, rank, world_size)

    mine = lay.rank_groups(rank, world_size)
    done = writer.done_groups()
    todo = [g for g in mine if g not in done]
    n_mine = sum(len(lay.group_samples(g)) for g in mine)
    n_done = n_mine - sum(len(lay.group_samples(g)) for g in todo)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=n_mine, initial=n_done, unit="sample", desc=f"extract {teacher.name}", file=sys.stderr,
                   mininterval=0.5, smoothing=0.1)
    t_fwd = t_write = t_blocked = 0.0
    delay = float(os.environ.get("KDCACHE_TEST_GROUP_DELAY", "0") or 0)  # tests: widen the kill window
    storage = {k: F.storage_dtype(dtypes[k]) for k in keys}
    shapes = {k: tuple(writer.root[k].shape[1:]) for k in keys}

    def write(g, rows, energy, hashes) -> float:
        t = time.perf_counter()
        writer.write_group(g, rows, energy, hashes)
        return time.perf_counter() - t

    # Writes run in one background thread, overlapping the next group's forward; at most one
    # group waits, so memory stays at two groups' buffers. A group's marker is written after its
    # shards, by the same task, so a kill at any moment leaves no marker without data.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-store-write")
    pending: tuple[int, Future] | None = None

    def settle() -> None:
        nonlocal pending, t_write, t_blocked
        if pending is None:
            return
        g_prev, fut = pending
        t = time.perf_counter()
        t_write += fut.result()
        t_blocked += time.perf_counter() - t
        pending = None
        done.add(g_prev)
        if rank == 0 and world_size == 1:
            writer.record_partial_ranges(done)  # informational (`kdcache store info`)
        if bar is not None:
            bar.set_postfix_str(f"write {100 * t_blocked / max(t_fwd + t_blocked, 1e-9):.1f}%", refresh=False)

    advance = bar.update if bar is not None else (lambda k: None)
    try:
        with runner:  # a calculator's worker processes live while groups are computed
            for g in todo:
                t0 = time.perf_counter()
                lo, hi = lay.group_atoms(g)
                rows = {k: np.zeros((hi - lo, *shapes[k]), dtype=storage[k]) for k in keys}
                samples = lay.group_samples(g)
                energy = np.zeros(len(samples), dtype=np.float64)
                hashes = np.zeros(len(samples), dtype=np.uint64)
                step = runner.batch_size or len(samples)
                for b0 in range(samples.start, samples.stop, step):
                    ids = range(b0, min(b0 + step, samples.stop))
                    items = [dataset[i] for i in ids]
                    for i, item in zip(ids, items):
                        if int(item[K.POSITIONS].shape[0]) != int(lay.natoms[i]):
                            raise DataError(data, i, K.POSITIONS, f"has {item[K.POSITIONS].shape[0]} atoms but the "
                                            f"store was laid out for {int(lay.natoms[i])}: the dataset changed; "
                                            "use --overwrite")
                        hashes[i - samples.start] = np.int64(_sample_hash(item)).view(np.uint64)
                    pred = runner(items, ids, advance)
                    a = int(lay.atom_start[ids.start]) - lo
                    b = a + int(lay.natoms[ids.start : ids.stop].sum())
                    for k in keys:
                        rows[k][a:b] = F.to_storage(pred[k], dtypes[k])
                    energy[ids.start - samples.start : ids.stop - samples.start] = (
                        pred[K.ENERGY].detach().double().cpu().numpy() if has_energy else 0.0
                    )
                t_fwd += time.perf_counter() - t0
                settle()
                pending = (g, pool.submit(write, g, rows, energy, hashes))
                if delay:
                    settle()
                    time.sleep(delay)
            settle()
    finally:
        if pending is not None:  # an error in a forward: let the write in flight finish cleanly
            pending[1].exception()
        pool.shutdown(wait=True)
    if bar is not None:
        bar.close()

    if rank == 0:
        while writer.missing_groups():  # other ranks are still writing their shards
            time.sleep(0.5)
        total = time.perf_counter() - t_start
        writer.finalize(extra={"extraction": {
            "world_size": world_size,
            "device": str(dev),
            "rank0_seconds_forward": round(t_fwd, 3),
            "rank0_seconds_write": round(t_write, 3),
            "rank0_seconds_waiting_for_writes": round(t_blocked, 3),
            "rank0_seconds_total": round(total, 3),
        }})
    return ExtractResult(str(out), lay.num_samples, len(todo), time.perf_counter() - t_start, t_fwd, t_write,
                         bool(resumed), rank, world_size, t_blocked)


def _prepare_store(out, request, overwrite, dataset, n, dtypes, teacher, runner, codec, shard_atoms, chunk_atoms,
                   fingerprint, progress) -> bool:
    """Create the store, or check an existing one can be resumed. Returns True when resuming."""
    # an empty folder (made by hand, or by a scheduler) is a store yet to be created: the
    # rename below may replace it
    exists = out.exists() and any(out.iterdir())
    if exists and not overwrite:
        StoreWriter.open(out).check_request(request)
        return True
    if exists:
        if not (out / "zarr.json").is_file():
            raise StoreError(f"{out} is a folder but not a feature store; --overwrite replaces only stores: "
                             "remove it yourself or choose another --out")
        remove_store(out)
    if n == 0:
        raise ConfigError(f"{dataset!r} has no samples to extract")
    row_shapes = runner.row_shapes(dataset)
    natoms = dataset_natoms(dataset, n, progress=progress)
    # A dataset smaller than one shard gets one shard of its own size: padding a few thousand
    # atoms out to 64 k would make small stores mostly zeros on disk.
    needed = -(-int(np.sum(natoms)) // chunk_atoms) * chunk_atoms
    layout = F.Layout.plan(natoms, shard_atoms=min(shard_atoms, max(needed, chunk_atoms)), chunk_atoms=chunk_atoms)
    sample_index = np.arange(n, dtype=np.int64)
    provenance = {
        "teacher": teacher.describe(),
        "dataset": {**fingerprint, "path": str(Path(getattr(dataset, "path", "")).resolve()) if getattr(dataset, "path", None) else None},
        "graph": teacher.graph,
        "features": runner.keys,
        "has_energy": runner.has_energy,
        "warnings": list(teacher.warnings),
    }
    # build the empty store beside its final place and rename it: a kill during creation leaves
    # no half-made store under the requested name
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    remove_store(tmp)
    StoreWriter.create(tmp, layout, sample_index, row_shapes, dtypes, request, provenance, codec=codec)
    os.rename(tmp, out)
    return False
