"""What a store holds (``kdcache store info``) and whether it fits a dataset (``kdcache store verify``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import StoreError
from kdcache.store import format as F
from kdcache.store.reader import FeatureStore
from kdcache.store.writer import PROGRESS_DIR, jsonable, sample_hashes_digest


def _fingerprint_diffs(stored: dict, current: dict) -> list[str]:
    out = []
    for k in sorted(set(stored) | set(current)):
        if stored.get(k) != current.get(k):
            out.append(f"{k}: store {stored.get(k)!r} vs dataset {current.get(k)!r}")
    return out


def check_fingerprint(store: FeatureStore, dataset) -> None:
    """Refuse (StoreError) a dataset whose cheap fingerprint (files, sizes, count) differs from
    the one the store was extracted from."""
    stored = (store.provenance.get("request") or {}).get("dataset")
    if stored is None:
        raise StoreError(f"{store.path}: the store records no dataset fingerprint")
    fingerprint = getattr(dataset, "fingerprint", None)
    # a dataset without a fingerprint (a wrapper, a subset) is checked by size only; per-sample
    # hashes (`verify`, the trainer's join check) still catch different structures
    current = jsonable(fingerprint()) if callable(fingerprint) else stored
    diffs = _fingerprint_diffs(stored, current)
    if diffs:
        raise StoreError(
            f"{store.path} was not extracted from this dataset ({getattr(dataset, 'path', dataset)!s}): "
            + "; ".join(diffs[:4])
        )
    n = len(dataset)
    if store.num_samples and int(store.sample_index.max()) >= n:
        raise StoreError(f"{store.path}: stores sample {int(store.sample_index.max())} but the dataset has {n} samples")


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def store_info(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of a store (complete or not): contents, sizes, provenance."""
    import zarr

    store = FeatureStore.open(path, require_complete=False)
    prov = store.provenance
    root = zarr.open_group(str(store.path), mode="r", zarr_format=3)
    atoms = int(store.natoms.sum())
    arrays = {}
    for key in [*store.per_atom_keys, *F.PER_SAMPLE_KEYS]:
        arr = root[key]
        arrays[key] = {
            "shape": list(arr.shape),
            "dtype": store.dtypes.get(key, str(arr.dtype)),
            "stored_as": str(arr.dtype),
            "bytes_per_atom": (int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize) if key in store.per_atom_keys else None,
        }
    done_samples = sum(b - a for a, b in prov.get("complete_ranges") or [])
    progress = store.path / PROGRESS_DIR
    if not store.complete and progress.is_dir():
        lay = prov["layout"]
        starts = lay["group_sample_start"]
        done_samples = 0
        for p in progress.glob("group-*.npz"):
            g = int(p.stem.split("-")[1])
            done_samples += starts[g + 1] - starts[g]
    teacher = prov.get("teacher") or {}
    return {
        "path": str(store.path),
        "complete": store.complete,
        "num_samples": store.num_samples,
        "samples_done": store.num_samples if store.complete else done_samples,
        "num_atoms": atoms,
        "atom_axis": prov["layout"]["atom_axis"],
        "padding_fraction": 1 - atoms / prov["layout"]["atom_axis"] if prov["layout"]["atom_axis"] else 0.0,
        "shard_atoms": prov["layout"]["shard_atoms"],
        "chunk_atoms": prov["layout"]["chunk_atoms"],
        "codec": prov.get("codec"),
        "size_bytes": _dir_bytes(store.path),
        "arrays": arrays,
        "features": list(store.feature_keys),
        "teacher": {k: teacher.get(k) for k in ("name", "preset", "checkpoint", "checkpoint_sha256", "weights_sha256", "random_init", "warning") if k in teacher},
        "teacher_config": teacher.get("config"),
        "dataset": prov.get("dataset"),
        "graph": prov.get("graph"),
        "units": prov.get("units"),
        "kdcache_version": prov.get("kdcache_version"),
        "created": prov.get("created"),
        "finished": prov.get("finished"),
        "complete_ranges": prov.get("complete_ranges"),
        "warnings": prov.get("warnings", []),
    }


@dataclass
class VerifyReport:
    path: str
    complete: bool
    fingerprint_ok: bool
    fingerprint_problems: list[str] = field(default_factory=list)
    samples_checked: int = 0
    hash_mismatches: list[int] = field(default_factory=list)  # dataset indices
    digest_ok: bool = False

    @property
    def ok(self) -> bool:
        return self.complete and self.fingerprint_ok and not self.hash_mismatches and self.digest_ok

    def lines(self) -> list[str]:
        out = [
            f"store      {self.path}",
            f"complete   {'yes' if self.complete else 'NO (extraction not finished)'}",
            f"fingerprint {'matches' if self.fingerprint_ok else 'DIFFERS: ' + '; '.join(self.fingerprint_problems)}",
        ]
        if self.complete and self.fingerprint_ok:
            bad = len(self.hash_mismatches)
            out.append(
                f"samples    {self.samples_checked} checked, "
                + ("all hashes match" if not bad else f"{bad} DIFFER (first: {self.hash_mismatches[:5]})")
            )
            out.append(f"digest     {'matches' if self.digest_ok else 'DIFFERS'}")
        out.append("OK" if self.ok else "FAILED")
        return out


def verify_store(path: str | os.PathLike, dataset, progress: bool = False) -> VerifyReport:
    """Check a store against a dataset: complete? same fingerprint? every stored sample's hash
    (atomic numbers, positions, cell) equal to the dataset's?"""
    from kdcache.store.extract import _sample_hash

    store = FeatureStore.open(path, require_complete=False)
    rep = VerifyReport(path=str(store.path), complete=store.complete, fingerprint_ok=True)
    try:
        check_fingerprint(store, dataset)
    except StoreError as exc:
        rep.fingerprint_ok = False
        rep.fingerprint_problems = [str(exc)]
    if not (rep.complete and rep.fingerprint_ok):
        return rep
    it = range(store.num_samples)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="verify", unit="sample")
    for row in it:
        idx = int(store.sample_index[row])
        h = np.int64(_sample_hash(dataset[idx])).view(np.uint64)
        if h != store.sample_hash[row]:
            rep.hash_mismatches.append(idx)
    rep.samples_checked = store.num_samples
    want = ((store.provenance.get("dataset") or {}).get("sample_hashes_sha256"))
    rep.digest_ok = want == sample_hashes_digest(store.sample_hash)
    return rep


__all__ = ["VerifyReport", "check_fingerprint", "store_info", "verify_store"]
