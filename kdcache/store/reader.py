"""Fast reads of stored teacher targets for stage two.

zarr-python's own indexing costs milliseconds per call; a training loop needs tens of thousands of
samples per second. The store's uncompressed shards are plain C-order arrays followed by a small
index (see ``docs/store-format.md``), so :class:`FeatureStore` memory-maps each written shard
file once per process and gathers a batch's atom rows with numpy slicing. Anything not in that
form (a compressed store, a shard written by another tool) falls back to zarr for that shard.

Nothing damaged is served: the per-sample arrays are checked against their recorded checksums at
open, and each shard file when a process first opens it (a missing file, another size or
checksum, a broken shard index raise :class:`StoreError`). A shard is checked once per process,
however often it is read; the checksum runs at ~10 GB/s, below the cost of one copy.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import zarr

from kdcache import keys as K
from kdcache.errors import StoreError
from kdcache.store import format as F


class FeatureStore:
    """A finished (or, on request, partial) feature store opened for reading.

    Use :meth:`open`. Instances can be pickled into DataLoader workers: files are (re)opened
    lazily in each process.

    Args:
        path: the store folder.
        require_complete: refuse a store whose extraction has not finished.
        load_samples: check and load the per-sample arrays now; ``False`` leaves that to
            :meth:`load_samples` (``kdcache store verify`` first checks every file itself).
        check_identity: refuse a checksummed store whose metadata no longer gives its recorded
            identity (``False``: ``kdcache store verify``, which reports it instead).
    """

    def __init__(self, path: str | os.PathLike, require_complete: bool = True, load_samples: bool = True,
                 check_identity: bool = True):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path}: no feature store here (no zarr.json)")
        try:
            root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{self.path}: cannot open as a Zarr v3 store ({exc})") from exc
        attrs = dict(root.attrs).get(F.ATTR)
        if not attrs or attrs.get("format") != F.FORMAT_NAME:
            raise StoreError(f"{self.path}: not a kdcache feature store (no {F.ATTR!r} attribute)")
        self.format_version = int(attrs.get("format_version", 0))
        if self.format_version > F.FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {attrs['format_version']} is newer than this kdcache reads ({F.FORMAT_VERSION})")
        self.complete = bool(attrs.get("complete"))
        if require_complete and not self.complete:
            ranges = attrs.get("complete_ranges") or []
            done = sum(b - a for a, b in ranges)
            raise StoreError(
                f"{self.path}: the store is incomplete (extraction not finished: {done} of "
                f"{attrs.get('num_samples')} samples recorded); re-run the same `kdcache extract` command to resume it"
            )
        self.provenance: dict[str, Any] = attrs
        self.per_atom_keys: tuple[str, ...] = tuple(attrs["per_atom_keys"])
        self.dtypes: dict[str, str] = dict(attrs["dtypes"])
        self._records = self._checksum_records(attrs)
        if check_identity and self._records is not None:
            self._check_identity(attrs)
        self._arrays = {k: self._array(root, k) for k in (*F.PER_SAMPLE_KEYS, *self.per_atom_keys)}
        self._metas = {k: a.metadata for k, a in self._arrays.items()}
        self._shard_atoms = int(attrs["layout"]["shard_atoms"])
        self._specs = {k: F.shard_spec(self._arrays[k]) for k in self.per_atom_keys}
        self._pid = None
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._torch_maps: dict[tuple[str, int], torch.Tensor] = {}
        #: (key, shard) -> how it is read: "mmap" (fast path), "chunked" or "zarr"
        self.map_kinds: dict[tuple[str, int], str] = {}
        self._zarr_root = None
        if load_samples:
            self.load_samples()

    def load_samples(self) -> None:
        """Check the per-sample arrays' files (small: at every open, before anything is read)
        and load them."""
        if self.checksummed:  # (a format 1 store may lack the file of an all-zero chunk)
            for key in F.PER_SAMPLE_KEYS:
                for i in range(self.num_files(key)):
                    self.check_file(key, i)
        self.sample_index = self._values(K.SAMPLE_INDEX, np.int64)
        self.natoms = self._values(K.NATOMS, np.int64)
        self.atom_start = self._values(F.ATOM_START, np.int64)
        # a store without outputs holds no energies: its (zero) array is never served as one
        self.energy: np.ndarray | None = self._values(K.ENERGY, np.float64) if self.has_energy else None
        self.sample_hash = self._values(F.SAMPLE_HASH, np.uint64)
        # dataset index -> store row
        n = len(self.sample_index)
        self._contiguous = n > 0 and np.array_equal(self.sample_index, np.arange(self.sample_index[0], self.sample_index[0] + n))
        if n and not self._contiguous:
            order = np.argsort(self.sample_index, kind="stable")
            self._sorted_index = self.sample_index[order]
            self._sorted_rows = order

    def _values(self, key: str, dtype) -> np.ndarray:
        try:
            return np.asarray(self._arrays[key][:], dtype=dtype)
        except Exception as exc:  # a chunk zarr cannot decode (only possible unchecked: format 1)
            raise StoreError(f"{self.path}: array {key!r} cannot be read ({type(exc).__name__}: {exc}); "
                             f"{F.DAMAGED_HINT}") from exc

    # --- integrity --------------------------------------------------------------------------
    def _array(self, root, key: str):
        try:
            return root[key]
        except Exception as exc:  # zarr raises several types for absent or broken metadata
            raise StoreError(f"{self.path}: array {key!r} is missing or its metadata cannot be read ({exc}); "
                             f"{F.DAMAGED_HINT}") from exc

    def _checksum_records(self, attrs: dict) -> dict[str, list] | None:
        """``key -> [[nbytes, checksum], ...]`` of a finished store, or None where nothing is
        recorded (an unfinished store, or a format 1 store: read unverified)."""
        if not self.complete:
            return None
        rec = attrs.get("checksums") or {}
        if self.format_version < 2:
            warnings.warn(f"{self.path}: a format {self.format_version} store records no checksums; its contents are "
                          "read unverified (extract it again to get them)", stacklevel=3)
            return None
        if rec.get("algorithm") != F.CHECKSUM or not isinstance(rec.get("files"), dict):
            raise StoreError(f"{self.path}: a format {self.format_version} store must record {F.CHECKSUM} checksums of "
                             f"its files, this one records {rec.get('algorithm')!r}; {F.DAMAGED_HINT}")
        return rec["files"]

    def _check_identity(self, attrs: dict) -> None:
        """Refuse a finished format 2 store whose metadata is not what was written: hand-edited
        attributes (teacher, statistics, layout...) or arrays' ``zarr.json``, which the data
        files' checksums do not cover but its identity does. Cheap: one SHA-256 over a few small
        JSON documents, computed as the writer computed it (:func:`format.store_identity`).

        Raises:
            StoreError: naming the store, both identities and what to do.
        """
        recorded = attrs.get("identity")
        actual = F.store_identity(self.path, attrs)
        if recorded != actual:
            raise StoreError(f"{self.path}: its metadata (zarr.json attributes or an array's zarr.json) changed since "
                             f"it was written (identity {actual[:12]}..., {str(recorded)[:12]}... recorded; "
                             f"`kdcache store verify` shows it); {F.DAMAGED_HINT}")

    def _record(self, key: str, i: int) -> list | None:
        if self._records is None:
            return None
        files = self._records.get(key) or []
        if i >= len(files):
            raise StoreError(f"{self.path}: array {key!r}: no checksum recorded for its file {i}; {F.DAMAGED_HINT}")
        return files[i]

    @property
    def checksummed(self) -> bool:
        """The store records the checksum of every data file (a finished format 2 store)."""
        return self._records is not None

    def num_files(self, key: str) -> int:
        """Data files of array ``key``: shard files of a per-atom array, chunk files of a
        per-sample one."""
        return F.num_data_files(self._metas[key])

    def data_file(self, key: str, i: int) -> Path:
        return F.data_file(self.path, key, self._metas[key], i)

    def check_file(self, key: str, i: int, hash_data: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Check data file ``i`` of ``key`` (see :func:`format.check_data_file`).

        Returns:
            ``(bytes, shard index)``: the file memory-mapped, and its index for a shard file.

        Raises:
            StoreError: naming the store, the array and the file, when the file is damaged.
        """
        file = self.data_file(key, i)
        spec = self._specs.get(key)
        where = f"{self.path}: array {key!r}, {'shard' if spec else 'chunk'} file {file.relative_to(self.path).as_posix()}"
        raw = F.map_file(file)
        return raw, F.check_data_file(raw, self._record(key, i), where, spec, hash_data)

    @property
    def identity(self) -> str | None:
        """The identity the store records (a digest over its checksums and metadata; None for
        format 1 and unfinished stores)."""
        return self.provenance.get("identity") if self.complete else None

    @classmethod
    def open(cls, path: str | os.PathLike, dataset=None, require_complete: bool = True) -> "FeatureStore":
        """Open a store; with ``dataset``, also check it was made from that dataset (cheap:
        file names, sizes and sample count; ``kdcache store verify`` checks every sample)."""
        store = cls(path, require_complete=require_complete)
        if dataset is not None:
            check_fingerprint(store, dataset)
        return store

    # --- description ------------------------------------------------------------------------
    def standardizer(self, key: str):
        """The shift/scale of ``feature_norm: standard`` for stored target ``key``, from the
        statistics extraction recorded (:mod:`kdcache.store.stats`).

        Raises:
            StoreError: the store has no statistics of ``key`` (made before kdcache recorded them).
        """
        from kdcache.store.stats import Standardizer

        summary = (self.provenance.get("stats") or {}).get(key)
        if summary is None:
            raise StoreError(f"{self.path}: no statistics of {key!r} recorded (a store made by an older "
                             f"kdcache); extract it again, or train with feature_norm: none")
        return Standardizer.from_summary(key, summary)

    @property
    def has_energy(self) -> bool:
        """The store holds the teacher's energies (and forces): extracted with ``outputs``."""
        return bool(self.provenance.get("has_energy"))

    @property
    def feature_keys(self) -> tuple[str, ...]:
        keys = list(self.per_atom_keys)
        if self.has_energy:
            keys.append(K.ENERGY)
        return tuple(keys)

    @property
    def num_samples(self) -> int:
        return len(self.sample_index)

    def rows(self, indices: Iterable[int]) -> np.ndarray:
        """Store rows of dataset indices (StoreError names any index not in the store)."""
        idx = np.asarray(list(indices) if not isinstance(indices, (np.ndarray, torch.Tensor)) else indices, dtype=np.int64).reshape(-1)
        n = self.num_samples
        if n == 0:
            if idx.size:
                raise StoreError(f"{self.path}: store is empty; sample {int(idx[0])} not stored")
            return idx
        if self._contiguous:
            rows = idx - self.sample_index[0]
            bad = (rows < 0) | (rows >= n)
        else:
            pos = np.searchsorted(self._sorted_index, idx)
            pos_c = np.minimum(pos, n - 1)
            bad = self._sorted_index[pos_c] != idx
            rows = self._sorted_rows[pos_c]
        if bad.any():
            raise StoreError(f"{self.path}: dataset sample {int(idx[np.argmax(bad)])} is not in the store ({n} samples stored)")
        return rows

    # --- reading ----------------------------------------------------------------------------
    def _shard(self, key: str, shard: int) -> np.ndarray:
        """The whole shard ``shard`` of ``key`` as a ``[shard_atoms, *row]`` array (memory-mapped
        when possible). Opened lazily and checked (:func:`format.check_data_file`), once per
        process."""
        m = self._maps.get((key, shard))
        if m is not None:
            return m
        spec = self._specs[key]
        shape = (spec.shard_atoms, *spec.row_shape)
        m = index = None
        # a finished store has every shard file (kdcache writes them all); an unfinished one may
        # lack those of groups not written yet, which read as zeros
        if self.complete or self.data_file(key, shard).is_file():
            raw, index = self.check_file(key, shard)
        if spec.raw and index is not None:
            offset = F.contiguous_data_offset(index, spec)
            if offset is not None:
                # a plain ndarray view of the (checked) map: slicing a np.memmap subclass costs
                # more than copying a small sample's rows
                m = raw[offset : offset + spec.chunks_per_shard * spec.chunk_nbytes].view(spec.dtype).reshape(shape)
                self.map_kinds[(key, shard)] = "mmap"
            else:  # raw, but chunks absent or out of order (written by another tool)
                m = _ChunkedShard(raw, index, spec)
                self.map_kinds[(key, shard)] = "chunked"
        if m is None:  # compressed, or no shard file yet (an unfinished store): let zarr decode rows
            if self._zarr_root is None:
                self._zarr_root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            m = _ZarrRows(self._zarr_root[key], shard * spec.shard_atoms, f"{self.path}: array {key!r}, shard {shard}")
            self.map_kinds[(key, shard)] = "zarr"
        self._maps[(key, shard)] = m
        return m

    def _torch_shard(self, key: str, shard: int, bf16: bool):
        """A torch view of a memory-mapped shard (float16 / bfloat16); other shards give an
        object whose slices are converted on the fly."""
        t = self._torch_maps.get((key, shard))
        if t is None:
            m = self._shard(key, shard)
            if self.map_kinds.get((key, shard)) == "mmap":
                with warnings.catch_warnings():  # read-only map: torch is only ever read from it
                    warnings.simplefilter("ignore")
                    t = torch.from_numpy(m.view(np.int16)).view(torch.bfloat16) if bf16 else torch.from_numpy(m)
            else:
                t = _TorchRows(m, bf16)
            self._torch_maps[(key, shard)] = t
        return t

    def read_rows(
        self, rows: Sequence[int] | np.ndarray, keys: Sequence[str] | None = None, dtype: torch.dtype | None = torch.float32
    ) -> dict[str, torch.Tensor]:
        """Like :meth:`read` but addressed by store row."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        keys = self.per_atom_keys if keys is None else tuple(keys)
        pid = os.getpid()
        if self._pid != pid:  # fresh process (DataLoader worker): never share maps/handles
            self._maps, self.map_kinds, self._zarr_root, self._pid = {}, {}, None, pid
            self._torch_maps = {}
        natoms = self.natoms[rows]
        starts = self.atom_start[rows]
        total = int(natoms.sum())
        # (source shard, first row in shard, rows, destination offset) of every contiguous piece
        pieces: list[tuple[int, int, int, int]] = []
        dst = 0
        for a, n in zip(starts.tolist(), natoms.tolist()):
            while n:
                s, off = divmod(a, self._shard_atoms)
                take = min(n, self._shard_atoms - off)
                pieces.append((s, off, take, dst))
                a += take
                n -= take
                dst += take
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key not in self._specs:
                raise StoreError(f"{self.path}: the store has no {key!r} (it holds {list(self.per_atom_keys)})")
            spec = self._specs[key]
            stored = self.dtypes.get(key)
            bf16 = stored == "bfloat16"
            half = stored in ("float16", "bfloat16")
            shape = (total, *spec.row_shape)
            want = torch.float32 if dtype is None and not (half and key in F.HIDDEN_KEYS) else dtype
            if half and want == torch.float32:
                # one pass: torch widens each sample's rows straight from the map into the output
                # (numpy's float16 cast is ~10x slower; a float16 gather + widening costs 1.4x)
                wide = torch.from_numpy(np.empty(shape, dtype=np.float32))
                for s, off, take, d in pieces:
                    wide[d : d + take].copy_(self._torch_shard(key, s, bf16)[off : off + take])
                out[key] = wide
                continue
            # gather in the stored precision (a plain memcpy per piece) ...
            buf = np.empty(shape, dtype=spec.dtype if half else np.float32)
            maps = self._maps
            for s, off, take, d in pieces:
                m = maps.get((key, s))
                if m is None:
                    m = self._shard(key, s)
                buf[d : d + take] = m[off : off + take]
            t = torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16) if bf16 else torch.from_numpy(buf)
            if want is not None and t.dtype != want:
                wide = torch.from_numpy(np.empty(shape, dtype=np.float32))
                wide.copy_(t)
                t = wide if want == torch.float32 else wide.to(want)
            out[key] = t
        if self.energy is not None:  # absent, not zeros, where the teacher's energies were not stored
            out[K.ENERGY] = torch.from_numpy(self.energy[rows].astype(np.float32))
        out[K.NATOMS] = torch.from_numpy(natoms.copy())
        out[F.SAMPLE_HASH] = torch.from_numpy(self.sample_hash[rows].view(np.int64).copy())
        out[K.SAMPLE_INDEX] = torch.from_numpy(self.sample_index[rows].copy())
        return out

    def read(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        keys: Sequence[str] | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """Targets of dataset samples ``indices`` as tensors (eV, eV/Å).

        Per-atom arrays are concatenated in the given order of samples; ``energy [S]``
        (float32; only from a store that holds energies, see :attr:`has_energy`), ``natoms
        [S]`` (long), ``sample_hash [S]`` (uint64 bits as int64) and ``sample_index [S]`` come
        per sample.

        Args:
            indices: dataset indices (``sample_index`` of the samples).
            keys: per-atom keys to read (default: all stored).
            dtype: dtype of the per-atom arrays (default float32). ``None`` keeps hidden
                features in their stored precision (``torch.float16`` / ``torch.bfloat16``):
                half the bytes to copy, and the cast can happen on the GPU.
        """
        return self.read_rows(self.rows(indices), keys, dtype)

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["map_kinds"], state["_zarr_root"], state["_pid"] = {}, {}, None, None
        state["_torch_maps"], state["_arrays"] = {}, None  # arrays: only for load_samples(), done by now
        return state

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, samples={self.num_samples}, keys={self.feature_keys}, complete={self.complete})"


def check_fingerprint(store: FeatureStore, dataset) -> None:
    """Refuse (StoreError) a dataset whose cheap fingerprint (files, sizes, count) differs from
    the one the store was extracted from.

    Args:
        store: the opened store.
        dataset: the dataset it should come from.
    """
    stored = (store.provenance.get("request") or {}).get("dataset")
    if stored is None:
        raise StoreError(f"{store.path}: the store records no dataset fingerprint")
    fingerprint = getattr(dataset, "fingerprint", None)
    # a dataset without a fingerprint (a wrapper, a subset) is checked by size only; per-sample
    # hashes (`verify`, the trainer's join check) still catch different structures
    current = F.jsonable(fingerprint()) if callable(fingerprint) else stored
    diffs = [f"{k}: store {stored.get(k)!r} vs dataset {current.get(k)!r}"
             for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if diffs:
        raise StoreError(
            f"{store.path} was not extracted from this dataset ({getattr(dataset, 'path', dataset)!s}): "
            + "; ".join(diffs[:4])
        )
    n = len(dataset)
    if store.num_samples and int(store.sample_index.max()) >= n:
        raise StoreError(f"{store.path}: stores sample {int(store.sample_index.max())} but the dataset has {n} samples")


class _ChunkedShard:
    """Rows of an uncompressed shard whose inner chunks are not back to back: each chunk is a
    memory-mapped view, an absent chunk reads as zeros (the fill value)."""

    def __init__(self, raw: np.ndarray, index: np.ndarray, spec: F.ShardSpec):
        self.spec = spec
        self.chunks: list[np.ndarray | None] = []
        for off, nbytes in index.tolist():
            if off == F.ABSENT:
                self.chunks.append(None)
            else:
                self.chunks.append(raw[off : off + nbytes].view(spec.dtype).reshape(spec.chunk_atoms, *spec.row_shape))

    def __getitem__(self, sl: slice) -> np.ndarray:
        ca = self.spec.chunk_atoms
        out = np.zeros((sl.stop - sl.start, *self.spec.row_shape), dtype=self.spec.dtype)
        a = sl.start
        while a < sl.stop:
            c, off = divmod(a, ca)
            take = min(sl.stop - a, ca - off)
            if self.chunks[c] is not None:
                out[a - sl.start : a - sl.start + take] = self.chunks[c][off : off + take]
            a += take
        return out


class _ZarrRows:
    """Rows of one shard read through zarr (compressed stores): decodes only the needed chunks."""

    def __init__(self, array, base: int, where: str):
        self.array, self.base, self.where = array, base, where

    def __getitem__(self, sl: slice) -> np.ndarray:
        try:
            return np.asarray(self.array[self.base + sl.start : self.base + sl.stop])
        except Exception as exc:  # a chunk the codec cannot decode (a format 1 store has no checksums)
            raise StoreError(f"{self.where}: cannot be decoded ({type(exc).__name__}: {exc}); {F.DAMAGED_HINT}") from exc


class _TorchRows:
    """Slices of a non-mapped shard as torch tensors (float16 or bfloat16)."""

    def __init__(self, rows, bf16: bool):
        self.rows, self.bf16 = rows, bf16

    def __getitem__(self, sl: slice) -> torch.Tensor:
        a = np.ascontiguousarray(self.rows[sl])
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if self.bf16 else torch.from_numpy(a)
