"""Creating, filling, resuming and finishing a feature store.

Work is done in *groups* (see :class:`~kdcache.store.format.Layout`): a group's per-atom rows are
written as whole shards by one process, then a small marker file records that the group is in,
with its per-sample energies and hashes and the size and checksum of each of its shard files. A run
killed at any moment leaves at worst a group without a marker, which the next run redoes from
scratch; the store is marked complete only by :meth:`StoreWriter.finalize`, after every group's
marker is found: it records every data file's checksum and the store's identity.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import zarr

import kdcache
from kdcache import keys as K
from kdcache.errors import StoreError
from kdcache.hessian import UNIT as HVP_UNIT
from kdcache.store.stats import STATS_KEYS, RunningStats, merge_all
from kdcache.store import format as F

PROGRESS_DIR = ".kdcache-progress"
#: zarr skips writing a chunk that holds only the fill value; a store's every data file must exist
#: (an absent one is damage, and is checksummed), so every write asks for all of them. A run-time
#: setting, not stored with the array: asked for on every write.
_ALL_CHUNKS = {"write_empty_chunks": True}


def _codec_objects(codec: str):
    if codec == "none":
        return None
    if codec == "zstd":
        from zarr.codecs import ZstdCodec

        return [ZstdCodec(level=3)]
    if codec == "blosc-lz4":
        from zarr.codecs import BloscCodec

        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    raise StoreError(f"unknown codec {codec!r}; choose from {F.CODECS}")


def _atomic_write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _create_per_sample_arrays(root: zarr.Group, layout: F.Layout, sample_index: np.ndarray, energy_dtype: str) -> None:
    """The per-sample arrays of a new store: ``sample_index``, ``natoms``, ``atom_start`` now,
    ``energy`` and ``sample_hash`` filled by :meth:`StoreWriter.finalize` from the markers."""
    n = layout.num_samples
    chunk = max(1, min(n, 1 << 20))
    for key, values, dt in (
        (K.SAMPLE_INDEX, np.asarray(sample_index, dtype=np.int64), "int64"),
        (K.NATOMS, layout.natoms, "int64"),
        (F.ATOM_START, layout.atom_start, "int64"),
    ):
        arr = root.create_array(key, shape=(n,), chunks=(chunk,), dtype=dt, compressors=None, fill_value=0,
                                config=_ALL_CHUNKS)
        if n:
            arr[:] = values
    root.create_array(K.ENERGY, shape=(n,), chunks=(chunk,), dtype=F.storage_dtype(energy_dtype), compressors=None,
                      fill_value=0)
    root.create_array(F.SAMPLE_HASH, shape=(n,), chunks=(chunk,), dtype="uint64", compressors=None, fill_value=0)


def _create_per_atom_array(root: zarr.Group, key: str, layout: F.Layout, row: tuple[int, ...], dtype: str,
                           compressors) -> None:
    """One per-atom array of a new store: sharded along the atom axis as ``layout`` says."""
    arr = root.create_array(
        key,
        shape=(layout.atom_axis, *row),
        shards=(layout.shard_atoms, *row),
        chunks=(layout.chunk_atoms, *row),
        dtype=F.storage_dtype(dtype),
        compressors=compressors,
        fill_value=0,
        # every inner chunk is written, even all-zero padding, so that an uncompressed
        # shard file is exactly one C-order array plus its index (memory-mappable)
        config=_ALL_CHUNKS,
    )
    arr.attrs["kdcache_dtype"] = dtype
    if dtype == "bfloat16":
        arr.attrs["encoding"] = "bfloat16 stored as its raw uint16 bits (the upper 16 bits of a float32)"
    arr.attrs["unit"] = _unit(key)


class StoreWriter:
    """Writes one feature store.

    Args:
        path: the store folder (``*.zarr``).
        root: the opened zarr group.
    """

    #: write uncompressed shards directly, as zarr's sharding codec lays them out (2-5x faster);
    #: False lets zarr write them (the reference the direct writer is compared with)
    raw_shard_writes: bool = True

    def __init__(self, path: str | os.PathLike, root: zarr.Group):
        self.path = Path(path)
        self.root = root
        attrs = dict(root.attrs).get(F.ATTR)
        if not attrs:
            raise StoreError(f"{self.path}: not a kdcache feature store (no {F.ATTR!r} attribute)")
        self.attrs = attrs
        lay = attrs["layout"]
        self.layout = F.Layout(
            natoms=np.asarray(root[K.NATOMS][:], dtype=np.int64),
            shard_atoms=int(lay["shard_atoms"]),
            chunk_atoms=int(lay["chunk_atoms"]),
            atom_start=np.asarray(root[F.ATOM_START][:], dtype=np.int64),
            group_sample_start=np.asarray(lay["group_sample_start"], dtype=np.int64),
            group_shard_start=np.asarray(lay["group_shard_start"], dtype=np.int64),
        )
        self.dtypes: dict[str, str] = dict(attrs["dtypes"])
        self.per_atom_keys: tuple[str, ...] = tuple(attrs["per_atom_keys"])
        self.progress = self.path / PROGRESS_DIR

    # --- creation / resume ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: F.Layout,
        sample_index: np.ndarray,
        row_shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, str],
        request: Mapping[str, Any],
        provenance: Mapping[str, Any] | None = None,
        codec: str = "none",
    ) -> "StoreWriter":
        """Make a new, empty (incomplete) store.

        Args:
            path: the store folder; must not exist.
            layout: the packing of samples into shards.
            sample_index: ``[S]`` dataset index of each stored sample.
            row_shapes: per-atom key -> shape of one atom's row (``()`` for ``atom_energy``).
            dtypes: key -> logical dtype (``float16``/``bfloat16``/``float32``/``float64``);
                must include ``energy``.
            request: everything that decides the stored values (teacher, weights, dataset,
                features, dtypes, layout, batching: a
                :class:`~kdcache.store.request.StoreRecord`); a resume must present the same.
            provenance: extra descriptive attributes (teacher config, warnings, ...).
            codec: ``none`` (default; required for the memory-mapped reader's fast path),
                ``zstd`` or ``blosc-lz4``.
        """
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path} already exists")
        compressors = _codec_objects(codec)
        root = zarr.open_group(str(path), mode="w-", zarr_format=3)
        _create_per_sample_arrays(root, layout, sample_index, dtypes[K.ENERGY])
        per_atom = tuple(k for k in F.PER_ATOM_KEYS if k in row_shapes)
        for key in per_atom:
            _create_per_atom_array(root, key, layout, tuple(int(s) for s in row_shapes[key]), dtypes[key], compressors)
        attrs = {
            "format": F.FORMAT_NAME,
            "format_version": F.FORMAT_VERSION,
            "kdcache_version": kdcache.__version__,
            "created": _utcnow(),
            "complete": False,
            "complete_ranges": [],
            "num_samples": layout.num_samples,
            "per_atom_keys": list(per_atom),
            "dtypes": {k: dtypes[k] for k in (*per_atom, K.ENERGY)},
            "codec": codec,
            "units": {K.ENERGY: "eV", K.ATOM_ENERGY: "eV", K.FORCES: "eV/Å", K.POSITIONS: "Å"},
            "layout": {
                "shard_atoms": layout.shard_atoms,
                "chunk_atoms": layout.chunk_atoms,
                "atom_axis": layout.atom_axis,
                "num_groups": layout.num_groups,
                "group_sample_start": layout.group_sample_start.tolist(),
                "group_shard_start": layout.group_shard_start.tolist(),
            },
            "request": F.jsonable(request),
            **F.jsonable(dict(provenance or {})),
        }
        root.attrs[F.ATTR] = attrs
        (path / PROGRESS_DIR).mkdir(exist_ok=True)
        return cls(path, root)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "StoreWriter":
        path = Path(path)
        try:
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
        except Exception as exc:  # zarr raises several types for "not a group"
            raise StoreError(f"{path}: cannot open as a Zarr v3 store ({exc})") from exc
        return cls(path, root)

    def check_request(self, request: Mapping[str, Any]) -> None:
        """Refuse to continue a store made with different settings (names the differing ones)."""
        new = F.jsonable(request)
        old = self.attrs.get("request", {})
        if new == old:
            return
        diffs = [k for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)]
        detail = "; ".join(f"{k}: store has {_short(old.get(k))}, this run {_short(new.get(k))}" for k in diffs)
        raise StoreError(
            f"{self.path} was made with different settings ({detail}). "
            "Use the same command to resume it, or --overwrite to replace it."
        )

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    # --- groups -----------------------------------------------------------------------------
    @property
    def _raw_writes(self) -> bool:
        return self.attrs.get("codec", "none") == "none" and self.raw_shard_writes

    def _write_raw_shards(self, key: str, lo: int, block: np.ndarray) -> list[list]:
        """Write whole uncompressed shards as zarr's sharding codec would (chunks back to back,
        then the index and its CRC32C; tested byte for byte against zarr), without zarr's
        per-chunk encoding: 2-5x faster, and the file is replaced atomically. Returns each
        shard file's ``[nbytes, checksum]``, computed from the bytes in memory."""
        import google_crc32c

        arr = self.root[key]
        spec = F.shard_spec(arr)
        if not spec.raw or not spec.index_at_end:
            raise StoreError(f"{self.path}: {key} is not an uncompressed store with the index at the end")
        block = np.ascontiguousarray(block, dtype=spec.dtype)
        n = spec.chunks_per_shard
        index = np.empty((n, 2), dtype="<u8")
        index[:, 0] = np.arange(n, dtype=np.uint64) * np.uint64(spec.chunk_nbytes)
        index[:, 1] = spec.chunk_nbytes
        index_bytes = index.tobytes()
        if spec.index_nbytes == len(index_bytes) + 4:
            index_bytes += np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        records = []
        for i in range(block.shape[0] // spec.shard_atoms):
            path = F.data_file(self.path, key, arr.metadata, lo // spec.shard_atoms + i)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
            data = memoryview(block[i * spec.shard_atoms : (i + 1) * spec.shard_atoms]).cast("B")
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(index_bytes)
            os.replace(tmp, path)
            records.append([len(data) + len(index_bytes), F.checksum(data, index_bytes)])
        return records

    def _marker(self, g: int) -> Path:
        return self.progress / f"group-{g:08d}.npz"

    def done_groups(self) -> set[int]:
        if self.complete:
            return set(range(self.layout.num_groups))
        if not self.progress.is_dir():
            return set()
        done = set()
        for p in self.progress.glob("group-*.npz"):
            try:
                done.add(int(p.stem.split("-")[1]))
            except ValueError:
                continue
        return done

    def _shards_of(self, g: int) -> range:
        return range(int(self.layout.group_shard_start[g]), int(self.layout.group_shard_start[g + 1]))

    def write_group(self, g: int, rows: Mapping[str, np.ndarray], energy: np.ndarray, sample_hash: np.ndarray) -> None:
        """Write group ``g``: ``rows[key]`` covers the group's whole shards (``group_atoms(g)``),
        padding included, already in the storage dtype. Then record the group as done, with the
        size and checksum of each shard file written."""
        lo, hi = self.layout.group_atoms(g)
        samples = self.layout.group_samples(g)
        if len(energy) != len(samples) or len(sample_hash) != len(samples):
            raise StoreError(f"group {g}: expected {len(samples)} energies and sample hashes")
        records: dict[str, np.ndarray] = {}
        for key in self.per_atom_keys:
            block = rows[key]
            if block.shape[0] != hi - lo:
                raise StoreError(f"group {g}: {key} has {block.shape[0]} rows, expected {hi - lo}")
            if self._raw_writes:
                shard_records = self._write_raw_shards(key, lo, block)
            else:
                # whole shards: zarr writes them without reading; their checksums are taken from
                # the files zarr wrote (encoded bytes: only zarr knows them)
                arr = self.root[key].with_config(_ALL_CHUNKS)
                arr[lo:hi] = block
                shard_records = [F.file_record(F.data_file(self.path, key, arr.metadata, s)) for s in self._shards_of(g)]
            records[f"nbytes_{key}"] = np.array([r[0] for r in shard_records], dtype=np.int64)
            records[f"checksum_{key}"] = np.array([r[1] for r in shard_records], dtype="<U16")
            if key in STATS_KEYS:  # of the values as stored (after rounding), padding left out
                real = block[: int(self.layout.natoms[samples.start : samples.stop].sum())]
                if self.dtypes[key] == "bfloat16":
                    real = F.bf16_bits_to_float32(real)
                for name, value in RunningStats.of(key, real).to_arrays().items():
                    records[f"stats_{key}_{name}"] = value
        _atomic_write_npz(
            self._marker(g),
            energy=np.asarray(energy, dtype=np.float64),
            sample_hash=np.asarray(sample_hash, dtype=np.uint64),
            first_sample=np.int64(samples.start),
            **records,
        )

    def missing_groups(self) -> list[int]:
        done = self.done_groups()
        return [g for g in range(self.layout.num_groups) if g not in done]

    def finalize(self, extra: Mapping[str, Any] | None = None) -> None:
        """Collect per-sample values from the markers and mark the store complete. Raises
        :class:`StoreError` (store stays incomplete) if any group is missing."""
        if self.complete:
            return
        missing = self.missing_groups()
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} of {self.layout.num_groups} groups not written yet (first: {missing[0]})")
        n = self.layout.num_samples
        energy = np.zeros(n, dtype=np.float64)
        hashes = np.zeros(n, dtype=np.uint64)
        files: dict[str, list] = {key: [] for key in self.per_atom_keys}
        stats: dict[str, list[RunningStats] | None] = {k: [] for k in self.per_atom_keys if k in STATS_KEYS}
        for g in range(self.layout.num_groups):
            s = self.layout.group_samples(g)
            with np.load(self._marker(g)) as z:
                if int(z["first_sample"]) != s.start or len(z["energy"]) != len(s):
                    raise StoreError(f"{self.path}: progress marker of group {g} does not fit the layout")
                energy[s.start : s.stop] = z["energy"]
                hashes[s.start : s.stop] = z["sample_hash"]
                for key, parts in stats.items():
                    if parts is not None and f"stats_{key}_count" in z.files:
                        prefix = f"stats_{key}_"
                        parts.append(RunningStats.from_arrays(
                            key, {f[len(prefix):]: z[f] for f in z.files if f.startswith(prefix)}))
                    else:  # a group written by a kdcache older than statistics: none for the store
                        stats[key] = None
                for key in self.per_atom_keys:
                    if f"checksum_{key}" in z.files:
                        files[key] += [[int(b), str(c)] for b, c in zip(z[f"nbytes_{key}"], z[f"checksum_{key}"])]
                    else:  # a group written by a kdcache older than checksums (a resumed store)
                        meta = self.root[key].metadata
                        files[key] += [F.file_record(F.data_file(self.path, key, meta, i)) for i in self._shards_of(g)]
        if n:
            self.root[K.ENERGY].with_config(_ALL_CHUNKS)[:] = energy.astype(F.storage_dtype(self.dtypes[K.ENERGY]))
            self.root[F.SAMPLE_HASH].with_config(_ALL_CHUNKS)[:] = hashes
        for key in F.PER_SAMPLE_KEYS:  # written by now: take their checksums from the files
            arr = self.root[key]
            paths = [F.data_file(self.path, key, arr.metadata, i) for i in range(F.num_data_files(arr.metadata))]
            if not all(p.is_file() for p in paths):  # begun by a kdcache that let zarr skip all-zero chunks
                arr.with_config(_ALL_CHUNKS)[:] = arr[:]
            files[key] = [F.file_record(p) for p in paths]
        attrs = dict(self.attrs)
        dataset = dict(attrs.get("dataset") or {})
        dataset["num_stored"] = n
        dataset["sample_hashes_sha256"] = F.sample_hashes_digest(hashes)
        attrs["dataset"] = dataset
        attrs.update(F.jsonable(dict(extra or {})))
        # merged in group order: the same numbers however the groups were split over ranks
        attrs["stats"] = {k: merge_all(p).summary() for k, p in stats.items() if p}
        attrs["complete_ranges"] = [[0, n]] if n else []
        attrs["complete"] = True
        attrs["finished"] = _utcnow()
        attrs["format_version"] = F.FORMAT_VERSION  # a resumed store may have been begun by an older kdcache
        attrs["checksums"] = {"algorithm": F.CHECKSUM, "files": files}
        attrs["identity"] = F.store_identity(self.path, F.jsonable(attrs))
        self.root.attrs[F.ATTR] = attrs  # the one write that makes the store complete
        self.attrs = attrs
        shutil.rmtree(self.progress, ignore_errors=True)

    def record_partial_ranges(self, done: set[int] | None = None) -> None:
        """Write the sample ranges that are in so far into the attributes (informational: the
        marker files decide what a resume redoes)."""
        done = sorted(self.done_groups() if done is None else done)
        ranges: list[list[int]] = []
        for g in done:
            s = self.layout.group_samples(g)
            if ranges and ranges[-1][1] == s.start:
                ranges[-1][1] = s.stop
            else:
                ranges.append([s.start, s.stop])
        attrs = dict(self.attrs)
        attrs["complete_ranges"] = ranges
        self.root.attrs[F.ATTR] = attrs
        self.attrs = attrs


def remove_store(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _unit(key: str) -> str:
    return {K.ATOM_ENERGY: "eV", K.FORCES: "eV/Å", K.HVP: HVP_UNIT}.get(key, "teacher feature units (dimensionless)")


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= n else s[: n - 3] + "..."
