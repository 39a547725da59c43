"""The on-disk layout of a feature store (see ``docs/store-format.md``): names, dtypes, the packing
of samples into shards, and the parsing of Zarr v3 shard files for the memory-mapped reader.

A store is a Zarr v3 group. Per-atom arrays share one flat atom axis; samples are packed, in
dataset order, into *groups* that own whole shards (a group never shares a shard with another
group). That makes every unit of work (extraction, resume, one rank of a multi-process run) a set
of whole shard files, written once by one process, and keeps each sample inside the shards of its
group, so the reader gathers a sample from at most a few memory-mapped files.

Every data file (shard or chunk file) of a finished store has its size and checksum recorded in
the attributes, and the store an *identity*: a digest over those checksums and the metadata. The
checks of a file's bytes against its record live here, for the reader (once per file and process)
and ``kdcache store verify`` (every file).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache import keys as K
from kdcache.errors import StoreError

FORMAT_NAME = "kdcache-feature-store"
#: 2: version 1 + per-file checksums and the store identity (version 1 stores read as unverified)
FORMAT_VERSION = 2
#: the checksum of every data file: fast (~10 GB/s, zero-copy on a memory map), 64 bits
CHECKSUM = "xxh3_64"
#: attributes that say when and how a store was made, not what it holds: left out of its identity
VOLATILE_ATTRS = ("created", "finished", "extraction", "kdcache_version", "complete_ranges", "identity")
#: what every damage message ends with
DAMAGED_HINT = "the store is damaged; extract it again (`kdcache extract ... --overwrite`) or restore it from a copy"
#: root attribute that holds the provenance/format description
ATTR = "kdcache"

#: per-atom arrays and the shape of one atom's row (``d`` = channels, filled in at creation)
PER_ATOM_KEYS = (K.NODE, K.E2N, K.E2V, K.VECTOR, K.ATOM_ENERGY, K.FORCES, K.HVP)
#: per-sample arrays (always present)
SAMPLE_HASH = "sample_hash"
ATOM_START = "atom_start"
PER_SAMPLE_KEYS = (K.SAMPLE_INDEX, K.NATOMS, ATOM_START, K.ENERGY, SAMPLE_HASH)

#: what ``--features`` may name. "outputs" = per-sample energy + per-atom forces.
OUTPUTS = "outputs"
FEATURE_CHOICES = (K.NODE, K.E2N, K.E2V, K.VECTOR, K.ATOM_ENERGY, OUTPUTS)
#: hidden features (stored in the feature dtype); the rest are labels (stored in the label dtype)
HIDDEN_KEYS = (K.NODE, K.E2N, K.E2V, K.VECTOR)
#: stored in the feature dtype (``--dtype``): the hidden features and the Hessian-vector products
#: (``--hessian-probes``: a distillation target, not a label; float16 halves its 12·N·K bytes)
FEATURE_DTYPE_KEYS = (*HIDDEN_KEYS, K.HVP)

FEATURE_DTYPES = ("float16", "bfloat16", "float32")
LABEL_DTYPES = ("float32", "float64")
CODECS = ("none", "zstd", "blosc-lz4")

DEFAULT_SHARD_ATOMS = 65536
DEFAULT_CHUNK_ATOMS = 128


def jsonable(obj):
    """``obj`` as plain JSON types (tuples -> lists, numpy/torch scalars -> numbers): what a
    store's attributes hold, and what a resume and the identity compare."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def sample_hashes_digest(hashes: np.ndarray) -> str:
    """SHA-256 over the little-endian uint64 sample hashes in store order (the attribute
    ``dataset.sample_hashes_sha256``)."""
    return hashlib.sha256(np.ascontiguousarray(hashes, dtype="<u8").tobytes()).hexdigest()


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
    index_crc: bool = False  # the index is followed by its CRC32C

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
    index_crc = False
    for c in cfg["index_codecs"]:
        if c["name"] == "crc32c":
            index_nbytes += 4
            index_crc = True
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
        index_crc=index_crc,
    )


#: offset of an absent inner chunk in a shard index
ABSENT = 2**64 - 1


def shard_index(raw: np.ndarray, spec: ShardSpec, where: str) -> np.ndarray:
    """``[chunks_per_shard, 2]`` (offset, nbytes) of each inner chunk of a shard file's bytes;
    ``ABSENT`` marks an absent chunk.

    Args:
        raw: the whole file as uint8 (see :func:`map_file`).
        spec: the array's sharding layout.
        where: names the file in errors (store, array, file).

    Raises:
        StoreError: the file is shorter than its index, the index fails its CRC32C, or a chunk
            lies outside the file (a cut-off or overwritten file).
    """
    n = spec.index_nbytes
    if raw.size < n:
        raise StoreError(f"{where}: the file is cut off ({raw.size} bytes, shorter than its {n}-byte shard index); {DAMAGED_HINT}")
    tail = raw[raw.size - n :] if spec.index_at_end else raw[:n]
    body = tail[: 16 * spec.chunks_per_shard]
    if spec.index_crc:
        import google_crc32c  # a dependency of zarr

        stored = int(tail[16 * spec.chunks_per_shard :].view("<u4")[0])
        if google_crc32c.value(body.tobytes()) != stored:
            raise StoreError(f"{where}: its shard index fails its CRC32C (the file was cut off or overwritten); {DAMAGED_HINT}")
    index = body.view("<u8").reshape(-1, 2).copy()
    present = index[:, 0] != np.uint64(ABSENT)
    lo, hi = (0, raw.size - n) if spec.index_at_end else (n, raw.size)
    offsets, sizes = index[present, 0], index[present, 1]
    # (garbage offsets may be near 2**64: compare without adding, which could wrap around)
    if np.any((offsets < lo) | (offsets > hi) | (sizes > np.uint64(hi) - offsets)):
        raise StoreError(f"{where}: its shard index points outside the file's data; {DAMAGED_HINT}")
    if spec.raw and np.any(sizes != np.uint64(spec.chunk_nbytes)):
        raise StoreError(f"{where}: its shard index gives inner chunks of another size than the array's; {DAMAGED_HINT}")
    return index


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


# --- checksums and identity -------------------------------------------------------------------


def checksum(*buffers) -> str:
    """:data:`CHECKSUM` of the concatenated bytes of ``buffers`` (bytes-like or numpy arrays,
    read without copying), as 16 hex digits."""
    import xxhash

    h = xxhash.xxh3_64()
    for b in buffers:
        h.update(b)
    return f"{h.intdigest():016x}"


def map_file(path: str | os.PathLike) -> np.ndarray | None:
    """A file's bytes as a read-only uint8 array (memory-mapped: nothing is read until used), or
    None when there is no such file."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None
    if size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)


def file_record(path: str | os.PathLike) -> list:
    """``[nbytes, checksum]`` of a file as written (what the store records per data file)."""
    raw = map_file(path)
    if raw is None:
        raise StoreError(f"{path}: a data file just written is not there")
    return [int(raw.size), checksum(raw)]


def data_file(store: str | os.PathLike, key: str, metadata, i: int) -> Path:
    """The file of chunk (or shard) ``i`` along the first axis of array ``key``."""
    return Path(store) / key / metadata.encode_chunk_key((i,) + (0,) * (len(metadata.shape) - 1))


def num_data_files(metadata) -> int:
    """Chunks (or shards) along the first axis, the only axis kdcache splits."""
    step = int(metadata.chunk_grid.chunk_shape[0])
    return -(-int(metadata.shape[0]) // step)


def check_data_file(raw: np.ndarray | None, record, where: str, spec: ShardSpec | None = None,
                    hash_data: bool = True) -> np.ndarray | None:
    """Check a data file's bytes against what was recorded when it was written.

    Args:
        raw: the file's bytes (:func:`map_file`); None when the file is absent.
        record: its ``[nbytes, checksum]``; None when the store records none (a format 1
            store): then only the file's presence and its shard index are checked.
        where: names the file in errors (store, array, file).
        spec: the sharding layout of a shard file (its index is checked and returned).
        hash_data: compare the checksum (``False``: sizes and indexes only, ``verify --quick``).

    Returns:
        The shard index for a shard file, else None.

    Raises:
        StoreError: a missing file, another size, another checksum or a broken shard index.
    """
    if raw is None:
        raise StoreError(f"{where}: the file is missing; {DAMAGED_HINT}")
    if record is not None:
        nbytes, want = int(record[0]), str(record[1])
        if raw.size != nbytes:
            raise StoreError(f"{where}: the file has {raw.size} bytes, {nbytes} were written; {DAMAGED_HINT}")
        if hash_data:
            got = checksum(raw)
            if got != want:
                raise StoreError(f"{where}: its {CHECKSUM} checksum is {got}, {want} was recorded when it was written "
                                 f"(its bytes changed); {DAMAGED_HINT}")
    return shard_index(raw, spec, where) if spec is not None else None


def store_identity(path: str | os.PathLike, attrs: dict) -> str:
    """The identity of a finished store: SHA-256 over its attributes (which hold every data
    file's checksum) less :data:`VOLATILE_ATTRS`, and every array's metadata (``zarr.json``).

    Two stores with the same identity hold the same bytes, read the same way; a store extracted
    again with the same settings and teacher gets the same identity (times are left out).
    """
    arrays = {}
    for key in sorted({*PER_SAMPLE_KEYS, *attrs.get("per_atom_keys", ())}):
        meta = Path(path) / key / "zarr.json"
        try:
            arrays[key] = json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: array {key!r}: its metadata {meta} cannot be read ({exc}); {DAMAGED_HINT}") from exc
    content = {k: v for k, v in attrs.items() if k not in VOLATILE_ATTRS}
    text = json.dumps({"attrs": content, "arrays": arrays}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def recorded_identity(path: str | os.PathLike) -> str | None:
    """The identity a finished store records (cheap: one small JSON file), or None for anything
    else (no store, unfinished, format 1)."""
    try:
        attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"][ATTR]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return attrs.get("identity") if attrs.get("complete") else None
