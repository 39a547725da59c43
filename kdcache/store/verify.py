"""What a store holds (``kdcache store info``), whether it is intact and whether it fits a dataset
(``kdcache store verify``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.errors import StoreError
from kdcache.store import format as F
from kdcache.store.reader import FeatureStore, check_fingerprint
from kdcache.store.writer import PROGRESS_DIR


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
        "teacher": {k: teacher.get(k) for k in ("name", "preset", "checkpoint", "checkpoint_sha256", "weights_sha256", "random_init", "warning", "feature_modules") if k in teacher},
        "teacher_config": teacher.get("config"),
        "dataset": prov.get("dataset"),
        "graph": prov.get("graph"),
        "units": prov.get("units"),
        "kdcache_version": prov.get("kdcache_version"),
        "created": prov.get("created"),
        "finished": prov.get("finished"),
        "complete_ranges": prov.get("complete_ranges"),
        "warnings": prov.get("warnings", []),
        "format_version": store.format_version,
        "checksummed": store.checksummed,
        "identity": store.identity,
    }


@dataclass
class VerifyReport:
    """What ``kdcache store verify`` found (:meth:`lines` prints it)."""

    path: str
    complete: bool
    format_version: int = 0
    #: "all" (every byte hashed), "quick" (sizes and shard indexes only), "none" (format 1)
    checksums: str = "none"
    files_checked: int = 0
    bytes_hashed: int = 0
    damaged: list[str] = field(default_factory=list)  # one line per damaged file
    identity: str | None = None
    identity_ok: bool | None = None  # None: no identity recorded
    dataset_checked: bool = False
    dataset_skipped: str | None = None  # why a dataset that was given was not compared
    fingerprint_ok: bool = True
    fingerprint_problems: list[str] = field(default_factory=list)
    samples_checked: int = 0
    hash_mismatches: list[int] = field(default_factory=list)  # dataset indices
    digest_ok: bool = False

    @property
    def ok(self) -> bool:
        dataset_ok = not self.dataset_checked or (self.fingerprint_ok and not self.hash_mismatches)
        return self.complete and not self.damaged and self.identity_ok is not False and self.digest_ok and dataset_ok

    def lines(self) -> list[str]:
        out = [
            f"store      {self.path}",
            f"complete   {'yes' if self.complete else 'NO (extraction not finished)'}",
        ]
        if not self.complete:
            return out + ["FAILED"]
        what = {"all": "every byte checked against its checksum",
                "quick": "present, sizes and shard indexes checked (--quick: contents not hashed)",
                "none": "present and shard indexes checked; NO checksums recorded (format 1): contents UNVERIFIED"}
        bad = len(self.damaged)
        out.append(f"files      {self.files_checked} data files, {what[self.checksums]}"
                   + (f" ({human_bytes(self.bytes_hashed)} hashed)" if self.bytes_hashed else "")
                   + (f": {bad} DAMAGED" if bad else ""))
        out += [f"DAMAGED    {line}" for line in self.damaged[:20]]
        if bad > 20:
            out.append(f"DAMAGED    ... and {bad - 20} more")
        if self.identity_ok is None:
            out.append("identity   none recorded (format 1 store)")
        else:
            out.append(f"identity   {self.identity or 'NONE recorded'} " + ("matches its checksums and metadata" if self.identity_ok else
                                                         "DIFFERS: the store's metadata changed since it was written"))
        if self.dataset_checked:
            out.append(f"fingerprint {'matches' if self.fingerprint_ok else 'DIFFERS: ' + '; '.join(self.fingerprint_problems)}")
            if self.fingerprint_ok:
                nbad = len(self.hash_mismatches)
                out.append(f"samples    {self.samples_checked} checked, "
                           + ("all hashes match" if not nbad else f"{nbad} DIFFER (first: {self.hash_mismatches[:5]})"))
        else:
            out.append(f"dataset    not checked: {self.dataset_skipped}" if self.dataset_skipped else
                       "dataset    not checked (no --data)")
        if not self.damaged:
            out.append(f"digest     {'matches' if self.digest_ok else 'DIFFERS'}")
        if self.damaged:
            out.append(F.DAMAGED_HINT)
        if self.checksums == "none":
            out.append("WARNING: this store predates checksums: damaged shard contents cannot be detected; "
                       "extract it again to get them")
        out.append("OK" if self.ok else "FAILED")
        return out


def human_bytes(n: float) -> str:
    """``n`` bytes as ``12 B``, ``3.4 MiB``, ..."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def verify_store(path: str | os.PathLike, dataset=None, quick: bool = False, progress: bool = False) -> VerifyReport:
    """Check a store: complete? every data file present and equal to what was written (its size
    and checksum; ``quick``: sizes and shard indexes only)? its identity equal to the one
    recomputed from its metadata? With ``dataset``: made from it (fingerprint, and every stored
    sample's hash of atomic numbers, positions and cell equal to the dataset's)?

    Args:
        path: the store folder.
        dataset: the dataset the store should come from (None: not checked).
        quick: skip hashing the per-atom shard files (the per-sample ones are small and hashed).
        progress: show progress bars.
    """
    # the identity is compared below and reported, not refused at open
    store = FeatureStore(path, require_complete=False, load_samples=False, check_identity=False)
    rep = VerifyReport(path=str(store.path), complete=store.complete, format_version=store.format_version)
    if not rep.complete:
        return rep
    rep.checksums = ("quick" if quick else "all") if store.checksummed else "none"
    files = [(k, i) for k in (*F.PER_SAMPLE_KEYS, *store.per_atom_keys) for i in range(store.num_files(k))]
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="verify files", unit="file")
    hint = "; " + F.DAMAGED_HINT  # printed once, not on every damaged file's line
    damaged_keys = set()
    for key, i in it:
        hash_data = store.checksummed and (not quick or key in F.PER_SAMPLE_KEYS)
        try:
            raw, _ = store.check_file(key, i, hash_data=hash_data)
            rep.bytes_hashed += raw.size if hash_data else 0
        except StoreError as exc:
            rep.damaged.append(str(exc).removesuffix(hint))
            damaged_keys.add(key)
        rep.files_checked += 1
    recorded = store.identity
    if recorded is not None or store.checksummed:  # a format 2 store must record one
        rep.identity = recorded
        try:
            rep.identity_ok = recorded is not None and F.store_identity(store.path, store.provenance) == recorded
        except StoreError as exc:
            rep.damaged.append(str(exc).removesuffix(hint))
            rep.identity_ok = False
    if damaged_keys & set(F.PER_SAMPLE_KEYS):
        # the per-sample values (the samples' hashes among them) cannot be trusted: nothing more to compare
        if dataset is not None:
            rep.dataset_skipped = "skipped, the store's per-sample arrays are damaged (its sample hashes cannot be trusted)"
        return rep
    store.load_samples()
    rep.digest_ok = (store.provenance.get("dataset") or {}).get("sample_hashes_sha256") == F.sample_hashes_digest(store.sample_hash)
    if dataset is not None:
        _check_dataset(store, dataset, rep, progress)
    return rep


def _check_dataset(store: FeatureStore, dataset, rep: VerifyReport, progress: bool) -> None:
    """Fingerprint and every stored sample's hash against ``dataset`` (into ``rep``)."""
    from kdcache.data.sample import sample_hash  # the join key's one definition (imports PyG: only here)

    rep.dataset_checked = True
    try:
        check_fingerprint(store, dataset)
    except StoreError as exc:
        rep.fingerprint_ok = False
        rep.fingerprint_problems = [str(exc)]
        return
    it = range(store.num_samples)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="verify samples", unit="sample")
    for row in it:
        idx = int(store.sample_index[row])
        h = np.int64(sample_hash(dataset[idx])).view(np.uint64)
        if h != store.sample_hash[row]:
            rep.hash_mismatches.append(idx)
    rep.samples_checked = store.num_samples


__all__ = ["VerifyReport", "human_bytes", "store_info", "verify_store"]
