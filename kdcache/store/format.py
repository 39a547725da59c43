"""The on-disk layout of a feature store (see ``docs/store-format.md``): names, dtypes, the packing
of samples into shards, and the parsing of Zarr v3 shard files for the memory-mapped reader.

A store is a Zarr v3 group. Per-atom arrays share one flat atom axis; samples are packed, in
dataset order, into *groups* that own whole shards (a group never shares a shard with another
group). That makes every unit of work (extraction, resume, one rank of a multi-process run) a set
of whole shard files, written once by one process, and keeps each sample inside the shards of its
group, so the reader gathers a sample from at most a few memory-mapped files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdcache import keys as K
from kdcache.errors import StoreError

FORMAT_NAME = "kdcache-feature-store"
FORMAT_VERSION = 1
#: root attribute that holds the provenance/format description
ATTR = "kdcache"

#: per-atom arrays and the shape of one atom's row (``d`` = channels, filled in at creation)
PER_ATOM_KEYS = (K.NODE, K.E2N, K.E2V, K.VECTOR, K.ATOM_ENERGY, K.FORCES)
#: per-sample arrays (always present)
SAMPLE_HASH = "sample_hash"
ATOM_START = "atom_start"
PER_SAMPLE_KEYS = (K.SAMPLE_INDEX, K.NATOMS, ATOM_START, K.ENERGY, SAMPLE_HASH)

#: what ``--features`` may name. "outputs" = per-sample energy + per-atom forces.
OUTPUTS = "outputs"
FEATURE_CHOICES = (K.NODE, K.E2N, K.E2V, K.VECTOR, K.ATOM_ENERGY, OUTPUTS)
#: hidden features (stored in the feature dtype); the rest are labels (stored in the label dtype)
HIDDEN_KEYS = (K.NODE, K.E2N, K.E2V, K.VECTOR)

FEATURE_DTYPES = ("float16", "bfloat16", "float32")
LABEL_DTYPES = ("float32", "float64")
CODECS = ("none", "zstd", "blosc-lz4")

DEFAULT_SHARD_ATOMS = 65536
DEFAULT_CHUNK_ATOMS = 128


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype on disk for a logical dtype (bfloat16 -> its raw uint16 bits)."""
    if dtype == "bfloat16":
        return np.dtype("<u2")
    if dtype in ("float16", "float32", "float64"):
        return np.dtype(dtype).newbyteorder("<")
    raise StoreError(f"unknown store dtype {dtype!r}; choose from {FEATURE_DTYPES + LABEL_DTYPES}")


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor in the on-disk representation of ``dtype`` (numpy, CPU)."""
    t = t.detach()
    if dtype == "bfloat16":
        # zarr has no bfloat16: keep the raw bits; torch rounds to nearest even.
        return t.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return t.to(getattr(torch, dtype)).cpu().numpy()


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (uint16) -> float32 (exact: bfloat16 is the upper half of float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class Layout:
    """Where every sample's atoms sit on the atom axis.

    Args:
        natoms: ``[S]`` atoms of each stored sample, in store order.
        shard_atoms: atoms per shard (the unit one process writes).
        chunk_atoms: atoms per inner chunk (the unit plain zarr reads); divides ``shard_atoms``.
    """

    natoms: np.ndarray
    shard_atoms: int
    chunk_atoms: int
    atom_start: np.ndarray
    group_sample_start: np.ndarray  # [G+1] first sample of each group (+ total)
    group_shard_start: np.ndarray  # [G+1] first shard of each group (+ total shards)

    @classmethod
    def plan(cls, natoms, shard_atoms: int = DEFAULT_SHARD_ATOMS, chunk_atoms: int = DEFAULT_CHUNK_ATOMS) -> "Layout":
        """Pack samples greedily in order: a group takes samples while they fit into one shard;
        a sample larger than a shard gets a group of its own spanning several shards."""
        natoms = np.asarray(natoms, dtype=np.int64)
        if shard_atoms <= 0 or chunk_atoms <= 0 or shard_atoms % chunk_atoms:
            raise StoreError(f"shard_atoms ({shard_atoms}) must be a positive multiple of chunk_atoms ({chunk_atoms})")
        if natoms.size and natoms.min() <= 0:
            bad = int(np.argmin(natoms))
            raise StoreError(f"sample at store row {bad} has {int(natoms[bad])} atoms")
        atom_start = np.zeros(len(natoms), dtype=np.int64)
        g_samples, g_shards = [0], [0]
        shard = 0  # first shard of the open group
        fill = 0  # atoms used in the open group
        for i, n in enumerate(natoms.tolist()):
            if fill and fill + n > shard_atoms:  # close the open group
                shard += -(-fill // shard_atoms)
                g_samples.append(i)
                g_shards.append(shard)
                fill = 0
            atom_start[i] = shard * shard_atoms + fill
            fill += n
        if fill:
            shard += -(-fill // shard_atoms)
            g_samples.append(len(natoms))
            g_shards.append(shard)
        return cls(
            natoms=natoms,
            shard_atoms=int(shard_atoms),
            chunk_atoms=int(chunk_atoms),
            atom_start=atom_start,
            group_sample_start=np.asarray(g_samples, dtype=np.int64),
            group_shard_start=np.asarray(g_shards, dtype=np.int64),
        )

    @property
    def num_samples(self) -> int:
        return len(self.natoms)

    @property
    def num_groups(self) -> int:
        return len(self.group_sample_start) - 1

    @property
    def num_shards(self) -> int:
        return int(self.group_shard_start[-1])

    @property
    def atom_axis(self) -> int:
        """Length of the (padded) atom axis."""
        return self.num_shards * self.shard_atoms

    def group_samples(self, g: int) -> range:
        return range(int(self.group_sample_start[g]), int(self.group_sample_start[g + 1]))

    def group_atoms(self, g: int) -> tuple[int, int]:
        """Atom-axis range ``[lo, hi)`` that group ``g`` owns (whole shards)."""
        return int(self.group_shard_start[g]) * self.shard_atoms, int(self.group_shard_start[g + 1]) * self.shard_atoms

    def rank_groups(self, rank: int, world_size: int) -> range:
        """Contiguous groups of one rank, balanced by shard count (each rank owns whole shards)."""
        total = self.num_shards
        lo_target, hi_target = total * rank // world_size, total * (rank + 1) // world_size
        starts = self.group_shard_start[:-1]
        lo = int(np.searchsorted(starts, lo_target, side="left"))
        hi = int(np.searchsorted(starts, hi_target, side="left")) if rank < world_size - 1 else self.num_groups
        return range(lo, hi)


# --- shard files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """What the fast reader needs to know about one per-atom zarr array."""

    shard_atoms: int
    chunk_atoms: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    raw: bool  # inner chunks stored as plain little-endian bytes (no compression)
    index_at_end: bool
    index_nbytes: int  # encoded size of the shard index

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_atoms // self.chunk_atoms

    @property
    def chunk_nbytes(self) -> int:
        return self.chunk_atoms * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def shard_spec(array) -> ShardSpec:
    """Read the sharding layout of a zarr v3 array (as written by :mod:`kdcache.store.writer`)."""
    meta = array.metadata.to_dict()
    codecs = meta["codecs"]
    shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        raise StoreError(f"array {array.path!r} is not sharded along the atom axis")
    cfg = codecs[0]["configuration"]
    inner = tuple(cfg["chunk_shape"])
    if inner[1:] != shard_shape[1:] or shard_shape[1:] != tuple(array.shape[1:]):
        raise StoreError(f"array {array.path!r}: shards/chunks must split only the atom axis")
    inner_codecs = list(cfg["codecs"])
    raw = len(inner_codecs) == 1 and inner_codecs[0]["name"] == "bytes" and (
        inner_codecs[0].get("configuration", {}).get("endian", "little") == "little"
    )
    n_chunks = shard_shape[0] // inner[0]
    index_nbytes = 16 * n_chunks
    for c in cfg["index_codecs"]:
        if c["name"] == "crc32c":
            index_nbytes += 4
        elif c["name"] != "bytes":
            raise StoreError(f"array {array.path!r}: unsupported shard index codec {c['name']!r}")
    dtype = np.dtype(str(array.dtype)).newbyteorder("<")
    return ShardSpec(
        shard_atoms=shard_shape[0],
        chunk_atoms=inner[0],
        row_shape=tuple(array.shape[1:]),
        dtype=dtype,
        raw=raw,
        index_at_end=cfg.get("index_location", "end") == "end",
        index_nbytes=index_nbytes,
    )


def read_shard_index(path: str, spec: ShardSpec) -> np.ndarray:
    """``[chunks_per_shard, 2]`` (offset, nbytes) of each inner chunk; 2**64-1 marks an absent chunk."""
    with open(path, "rb") as f:
        if spec.index_at_end:
            f.seek(-spec.index_nbytes, 2)
        raw = f.read(spec.index_nbytes)
    return np.frombuffer(raw[: 16 * spec.chunks_per_shard], dtype="<u8").reshape(-1, 2)


def contiguous_data_offset(index: np.ndarray, spec: ShardSpec) -> int | None:
    """Byte offset of the shard's data when all inner chunks are present, in order and back to
    back, i.e. the shard holds one plain C-order ``[shard_atoms, *row]`` array; else None."""
    if not spec.raw:
        return None
    n, size = spec.chunks_per_shard, spec.chunk_nbytes
    first = int(index[0, 0])
    expected = first + np.arange(n, dtype=np.uint64) * np.uint64(size)
    if np.array_equal(index[:, 0], expected) and np.all(index[:, 1] == size):
        return first
    return None
