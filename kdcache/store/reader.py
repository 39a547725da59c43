"""Fast reads of stored teacher targets for stage two.

zarr-python's own indexing costs milliseconds per call; a training loop needs tens of thousands of
samples per second. The store's uncompressed shards are plain C-order arrays followed by a small
index (see ``docs/store-format.md``), so :class:`FeatureStore` memory-maps each written shard
file once per process and gathers a batch's atom rows with numpy slicing. Anything not in that
form (a compressed store, a shard written by another tool) falls back to zarr for that shard.
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
    """

    def __init__(self, path: str | os.PathLike, require_complete: bool = True):
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
        if int(attrs.get("format_version", 0)) > F.FORMAT_VERSION:
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
        self.sample_index = np.asarray(root[K.SAMPLE_INDEX][:], dtype=np.int64)
        self.natoms = np.asarray(root[K.NATOMS][:], dtype=np.int64)
        self.atom_start = np.asarray(root[F.ATOM_START][:], dtype=np.int64)
        self.energy = np.asarray(root[K.ENERGY][:], dtype=np.float64)
        self.sample_hash = np.asarray(root[F.SAMPLE_HASH][:], dtype=np.uint64)
        self._shard_atoms = int(attrs["layout"]["shard_atoms"])
        self._specs = {k: F.shard_spec(root[k]) for k in self.per_atom_keys}
        self._chunk_keys = {k: root[k].metadata for k in self.per_atom_keys}
        # dataset index -> store row
        n = len(self.sample_index)
        self._row_of: np.ndarray | None = None
        self._contiguous = n > 0 and np.array_equal(self.sample_index, np.arange(self.sample_index[0], self.sample_index[0] + n))
        if n and not self._contiguous:
            order = np.argsort(self.sample_index, kind="stable")
            self._sorted_index = self.sample_index[order]
            self._sorted_rows = order
        self._pid = None
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._torch_maps: dict[tuple[str, int], torch.Tensor] = {}
        #: (key, shard) -> how it is read: "mmap" (fast path), "chunked" or "zarr"
        self.map_kinds: dict[tuple[str, int], str] = {}
        self._zarr_root = None

    @classmethod
    def open(cls, path: str | os.PathLike, dataset=None, require_complete: bool = True) -> "FeatureStore":
        """Open a store; with ``dataset``, also check it was made from that dataset (cheap:
        file names, sizes and sample count; ``kdcache store verify`` checks every sample)."""
        store = cls(path, require_complete=require_complete)
        if dataset is not None:
            from kdcache.store.verify import check_fingerprint

            check_fingerprint(store, dataset)
        return store

    # --- description ------------------------------------------------------------------------
    @property
    def feature_keys(self) -> tuple[str, ...]:
        keys = list(self.per_atom_keys)
        if self.provenance.get("has_energy"):
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
        when possible). Opened lazily, once per process."""
        m = self._maps.get((key, shard))
        if m is not None:
            return m
        spec = self._specs[key]
        rel = self._chunk_keys[key].encode_chunk_key((shard,) + (0,) * len(spec.row_shape))
        file = self.path / key / rel
        shape = (spec.shard_atoms, *spec.row_shape)
        m = None
        if spec.raw and file.is_file():
            index = F.read_shard_index(str(file), spec)
            offset = F.contiguous_data_offset(index, spec)
            if offset is not None:
                # a plain ndarray view of the map (it keeps the map alive): slicing a np.memmap
                # subclass costs more than copying a small sample's rows
                m = np.memmap(file, dtype=spec.dtype, mode="r", offset=offset, shape=shape).view(np.ndarray)
                self.map_kinds[(key, shard)] = "mmap"
            else:  # raw, but chunks absent or out of order (written by another tool)
                m = _ChunkedShard(file, index, spec)
                self.map_kinds[(key, shard)] = "chunked"
        if m is None:  # compressed, or no shard file (all fill value): let zarr decode rows
            if self._zarr_root is None:
                self._zarr_root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            m = _ZarrRows(self._zarr_root[key], shard * spec.shard_atoms)
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
        (float32), ``natoms [S]`` (long), ``sample_hash [S]`` (uint64 bits as int64) and
        ``sample_index [S]`` come per sample.

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
        state["_torch_maps"] = {}
        return state

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, samples={self.num_samples}, keys={self.feature_keys}, complete={self.complete})"


class _ChunkedShard:
    """Rows of an uncompressed shard whose inner chunks are not back to back: each chunk is a
    memory-mapped view, an absent chunk reads as zeros (the fill value)."""

    def __init__(self, file, index: np.ndarray, spec: F.ShardSpec):
        self.spec = spec
        self.chunks: list[np.ndarray | None] = []
        raw = np.memmap(file, dtype=np.uint8, mode="r")
        for off, nbytes in index.tolist():
            if off == 2**64 - 1:
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

    def __init__(self, array, base: int):
        self.array, self.base = array, base

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.array[self.base + sl.start : self.base + sl.stop])


class _TorchRows:
    """Slices of a non-mapped shard as torch tensors (float16 or bfloat16)."""

    def __init__(self, rows, bf16: bool):
        self.rows, self.bf16 = rows, bf16

    def __getitem__(self, sl: slice) -> torch.Tensor:
        a = np.ascontiguousarray(self.rows[sl])
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if self.bf16 else torch.from_numpy(a)
