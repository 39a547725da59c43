"""Stage-two loading: structures from the dataset joined with teacher targets from the store.

A batch is fetched as a whole (``__getitems__``): structures one by one from the dataset, the
targets of all of them with ONE ``store.read(indices)`` (the store's sampler keeps those indices in
a few chunks, so the read stays local). The join is by global dataset index and is checked
(atom counts, and the structure hash when the store records it).

Augmentation that moves atoms must move the targets with them: ``rotate`` turns positions, cell,
forces and every vector target (``e2v``, ``vector``, stored forces, ``hvp``) by the same rotation,
and the Hessian probes with them: they are drawn in the stored frame (:mod:`kdcache.hessian`) and
attached as ``hvp_probes`` before the rotation, so ``R·(H v) = (R H Rᵀ)(R v)`` pairs the rotated
target with the rotated probe. The rotation of a sample depends only on (seed, epoch, sample
index), so a resumed run sees the same rotations as an uninterrupted one, whatever the number of
loader workers.

Training batches go through :func:`kdcache.data.collate` with the labels required: a sample
without energy or forces, or with a value that is not finite in float32, stops the run with an
error naming its file, its dataset index and the field. Which energies and forces those are is
decided here too (``labels``, :func:`apply_label_source`): the dataset's, or the teacher's from
the store, so that the objective and the loader see one kind of labelled sample either way.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from kdcache import keys as K
from kdcache.data.batch import LABELS, collate, sample_file
from kdcache.data.sample import sample_hash
from kdcache.errors import ConfigError, DataError, KDCacheError
from kdcache.hessian import check_probe_rule, probe_vectors
from kdcache.train.config import AUGMENTATIONS

#: stored targets ride in a batch under ``kd_<store key>`` (e.g. ``kd_e2v [N, 3, d]``)
TARGET_PREFIX = "kd_"
#: store keys that rotate with the structure (the last axis, if any, is channels)
VECTOR_TARGETS = (K.E2V, K.VECTOR, K.FORCES, K.HVP)
PER_SAMPLE_TARGETS = (K.ENERGY,)
#: the store keys the teacher's labels come from (``labels: teacher|both``)
TEACHER_LABEL_KEYS = (K.ENERGY, K.FORCES)


def apply_label_source(sample, source: str) -> None:
    """Make ``sample``'s ``energy`` and ``forces`` the labels ``source`` trains on (in place).

    Args:
        sample: a sample with the teacher's energy and forces attached (``kd_energy``,
            ``kd_forces``) unless ``source`` is ``reference``.
        source: ``reference`` (the sample's own: unchanged), ``teacher`` (the teacher's, in place
            of any the sample has) or ``both`` (each of the two from the sample where it has it,
            else from the teacher).
    """
    if source == "reference":
        return
    for key in TEACHER_LABEL_KEYS:
        if source == "teacher" or getattr(sample, key, None) is None:
            # float32 like a dataset's own labels (make_sample): a batch then has one dtype
            sample[key] = sample[target_key(key)].to(torch.float32)


def target_key(store_key: str) -> str:
    return TARGET_PREFIX + store_key


def random_rotation(generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A uniformly random proper rotation (3x3, det +1) drawn from ``generator``."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def rotate_sample(data, rot: torch.Tensor, target_keys: Sequence[str] = ()) -> None:
    """Rotate a sample in place: ``x -> x @ R^T`` for positions, cell rows, forces, vector targets
    and Hessian probes (``[n, 3, ...]``: the axis after the atoms is the one turned)."""
    data[K.POSITIONS] = data[K.POSITIONS] @ rot.to(data[K.POSITIONS].dtype).T
    if getattr(data, K.CELL, None) is not None:
        data[K.CELL] = data[K.CELL] @ rot.to(data[K.CELL].dtype).T
    if getattr(data, K.FORCES, None) is not None:
        data[K.FORCES] = data[K.FORCES] @ rot.to(data[K.FORCES].dtype).T
    names = [target_key(k) for k in target_keys if k in VECTOR_TARGETS]
    if getattr(data, K.HVP_PROBES, None) is not None:
        names.append(K.HVP_PROBES)
    for name in names:
        t = data[name]
        data[name] = torch.einsum("ij,aj...->ai...", rot.to(t.dtype), t)


def _seed_of(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class JoinedDataset(Dataset):
    """Structures of ``dataset`` with the targets of ``store`` attached under ``kd_<key>``.

    Args:
        dataset: a kdcache dataset (items are ``Data`` with ``sample_index``).
        store: a :class:`kdcache.store.FeatureStore` (or anything with ``read(indices)``), or None.
        store_keys: store keys to attach (per-atom ones and per-sample ``energy``).
        augment: augmentations (``rotate`` only; others are refused).
        seed: seed of the augmentation randomness.
        check_hash: compare the store's ``sample_hash`` with the structure's (during the first
            epoch: by then every sample has been checked once; later epochs skip the cost).
        labels: the energies and forces to train on, ``reference``, ``teacher`` or ``both`` (see
            :func:`apply_label_source`); the teacher's are read from the store.
    """

    def __init__(self, dataset, store=None, store_keys: Sequence[str] = (), augment: Sequence[str] = (),
                 seed: int = 0, check_hash: bool = True, labels: str = "reference"):
        bad = [a for a in augment if a not in AUGMENTATIONS]
        if bad:
            raise ConfigError(
                f"augmentation {bad} cannot be applied: stored targets live in the frame of the stored "
                f"structure and only {list(AUGMENTATIONS)} can be carried over to them"
            )
        if labels != "reference" and store is None:
            raise ConfigError(f"labels {labels!r} come from the teacher: they need a feature store (--store)")
        self.dataset, self.store, self.labels = dataset, store, labels
        extra = TEACHER_LABEL_KEYS if labels != "reference" else ()
        self.store_keys = tuple(dict.fromkeys([*store_keys, *extra]))
        self.augment = tuple(augment)
        self.seed, self.epoch = int(seed), 0
        self.check_hash = check_hash
        self._hash_fn = sample_hash if store is not None and check_hash else None
        #: probes per sample of a store's Hessian-vector products (0: none read)
        self.hessian_probes = 0
        if store is not None and K.HVP in self.store_keys:
            self.hessian_probes = check_probe_rule(getattr(store, "provenance", {}), str(getattr(store, "path", "store")))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        samples = [self.dataset[int(i)] for i in indices]
        if self.store is not None and self.store_keys:
            self._attach(samples, [int(i) for i in indices])
        for s in samples:  # before a rotation, which then turns the labels' forces too
            apply_label_source(s, self.labels)
        if "rotate" in self.augment:
            for i, s in zip(indices, samples):
                gen = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, int(i)))
                rotate_sample(s, random_rotation(gen), self.store_keys)
        return samples

    def _attach(self, samples: list, indices: list[int]) -> None:
        glob = [int(s[K.SAMPLE_INDEX].reshape(-1)[0]) if getattr(s, K.SAMPLE_INDEX, None) is not None else i
                for s, i in zip(samples, indices)]
        per_atom = [k for k in self.store_keys if k not in PER_SAMPLE_TARGETS]
        # Hidden features stay in their stored precision (float16 reads ~2.5x faster and moves half
        # the bytes to the GPU); the objective casts them to the student's dtype. A rotation needs
        # them in float32 first.
        read_dtype = torch.float32 if "rotate" in self.augment else None
        got = self.store.read(glob, keys=per_atom, dtype=read_dtype)
        natoms = [int(s[K.POSITIONS].shape[0]) for s in samples]
        if K.NATOMS in got:
            stored = [int(n) for n in got[K.NATOMS].tolist()]
            for g, n, m in zip(glob, natoms, stored):
                if n != m:
                    raise DataError(sample_file(self.dataset, g), g, K.NATOMS,
                                    f"structure has {n} atoms but the store holds targets for {m}; "
                                    "the store was made from another dataset")
        if self._hash_fn is not None and self.epoch == 0 and "sample_hash" in got:
            for s, g, h in zip(samples, glob, got["sample_hash"].tolist()):
                mine = int(self._hash_fn(s))
                if mine >= 1 << 63:  # the store keeps uint64 hashes as int64
                    mine -= 1 << 64
                if mine != int(h):
                    raise DataError(sample_file(self.dataset, g), g, K.POSITIONS,
                                    "structure differs from the one the store's targets were computed on")
        for key in self.store_keys:
            if key not in got:
                raise DataError(getattr(self.store, "path", "store"), None, key, "target missing from the store")
            value = got[key]
            if key in PER_SAMPLE_TARGETS:
                for j, s in enumerate(samples):
                    s[target_key(key)] = value[j : j + 1]
                continue
            if value.shape[0] != sum(natoms):
                # a batch-wide mismatch: no single sample to blame, so name them all
                raise DataError(getattr(self.store, "path", "store"), None, key,
                                f"{value.shape[0]} target rows for the {sum(natoms)} atoms of samples {glob}")
            for s, part in zip(samples, torch.split(value, natoms)):
                s[target_key(key)] = part
        if self.hessian_probes:  # in the stored frame: a rotation turns them with the targets
            for s, g, n in zip(samples, glob, natoms):
                probes = probe_vectors(g, n, self.hessian_probes, getattr(s, K.FIXED, None))
                s[K.HVP_PROBES] = probes.to(torch.float32)


def make_batch_sampler(num_samples: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0,
                       world_size: int = 1, window: int | None = None, drop_last: bool = False):
    """The store's :class:`LocalBatchSampler`: shuffled windows of consecutive samples, so one
    batch's store reads stay within a few shards (also used without a store, for one code path)."""
    from kdcache.store import LocalBatchSampler

    kwargs = dict(shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size)
    if window:
        kwargs["window"] = window
    return LocalBatchSampler(num_samples, batch_size, **kwargs)


class SkipBatches:
    """Yield a batch sampler's index lists from number ``skip`` on (resume mid-epoch).

    Skipping happens on index lists only, so no sample is loaded for the skipped batches.
    """

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        for i, b in enumerate(self.sampler):
            if i >= self.skip:
                yield list(b)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class _Failure:
    """A kdcache error raised in a loader worker, carried to the main process as data: the
    DataLoader would re-raise it as a RuntimeError holding the worker's traceback, and the user
    would see that instead of one line naming the sample."""

    def __init__(self, exc: KDCacheError):
        # the class and its state, not the instance: DataError's __init__ takes four arguments,
        # so the instance does not unpickle
        self.kind, self.args, self.state = type(exc), exc.args, dict(vars(exc))

    def error(self) -> KDCacheError:
        exc = self.kind.__new__(self.kind)
        exc.args = self.args
        vars(exc).update(self.state)
        return exc


class _Guarded(Dataset):
    """``dataset``, with a kdcache error of a batch's loading returned as a :class:`_Failure`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]):
        try:
            if hasattr(self.dataset, "__getitems__"):
                return self.dataset.__getitems__(indices)
            return [self.dataset[int(i)] for i in indices]
        except KDCacheError as exc:
            return _Failure(exc)


def _labelled_collate(samples, dataset):
    if isinstance(samples, _Failure):
        return samples
    try:
        return collate(samples, dataset=dataset, require=LABELS)
    except KDCacheError as exc:
        return _Failure(exc)


class LabelledLoader(DataLoader):
    """A DataLoader of batches to train or evaluate on: every sample must carry finite energy and
    forces (see :func:`kdcache.data.collate`), and a user error raised while loading, in this
    process or in a worker, is raised as itself, naming the file, the sample's dataset index and
    the field.

    Args:
        dataset: the dataset (kdcache samples; a ``JoinedDataset`` for training).
        **kwargs: ``DataLoader`` options (``batch_size`` or ``batch_sampler``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, **kwargs):
        # a partial of a module function pickles to spawned workers
        super().__init__(_Guarded(dataset), collate_fn=functools.partial(_labelled_collate, dataset=dataset),
                         **kwargs)

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _Failure):
                raise batch.error()
            yield batch


def make_loader(dataset: Dataset, batch_sampler, num_workers: int = 0, pin_memory: bool = False,
                seed: int = 0) -> DataLoader:
    """The training loader: whole batches from ``batch_sampler``, labels required and checked."""
    # A private generator: creating the iterator must not draw from the global RNG (exact resume).
    gen = torch.Generator().manual_seed(seed)
    return LabelledLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
                          generator=gen)
