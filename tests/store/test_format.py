"""Layout, writer and reader on synthetic arrays (no model, no dataset)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import zarr

from kdcache import keys as K
from kdcache.errors import StoreError
from kdcache.store import FeatureStore, Layout, StoreWriter
from kdcache.store import format as F

SHAPES = {K.NODE: (8,), K.E2N: (5,), K.E2V: (3, 5), K.ATOM_ENERGY: (), K.FORCES: (3,)}


def test_layout_packs_samples_into_whole_shards():
    natoms = np.array([5, 6, 4, 20, 3, 3, 9, 1])
    lay = Layout.plan(natoms, shard_atoms=16, chunk_atoms=8)
    # groups: [5,6,4] (15 atoms), [20] (2 shards), [3,3,9,1] (16 atoms)
    assert lay.group_sample_start.tolist() == [0, 3, 4, 8]
    assert lay.group_shard_start.tolist() == [0, 1, 3, 4]
    assert lay.atom_start.tolist() == [0, 5, 11, 16, 48, 51, 54, 63]
    assert lay.atom_axis == 64
    # every sample lies inside the shards of its group; groups never share a shard
    for g in range(lay.num_groups):
        lo, hi = lay.group_atoms(g)
        for i in lay.group_samples(g):
            assert lo <= lay.atom_start[i] and lay.atom_start[i] + natoms[i] <= hi
    # ranks split shard-aligned, contiguous, covering every group once
    for w in (1, 2, 3, 5):
        got = [g for r in range(w) for g in lay.rank_groups(r, w)]
        assert got == list(range(lay.num_groups))
    with pytest.raises(StoreError):
        Layout.plan(natoms, shard_atoms=10, chunk_atoms=4)


def _write_synthetic(path, dtype: str, codec: str = "none", seed: int = 0, sample_index=None):
    rng = np.random.default_rng(seed)
    natoms = rng.integers(1, 12, size=23)
    lay = Layout.plan(natoms, shard_atoms=32, chunk_atoms=8)
    dtypes = {k: (dtype if k in F.HIDDEN_KEYS else "float64") for k in SHAPES}
    dtypes[K.ENERGY] = "float64"
    total = int(natoms.sum())
    values = {k: rng.standard_normal((total, *s)).astype(np.float32) * 3 for k, s in SHAPES.items()}
    energy = rng.standard_normal(len(natoms)) * 10
    hashes = rng.integers(0, 2**63, size=len(natoms)).astype(np.uint64) * 2 + 1  # uses the top bit too
    si = np.arange(len(natoms)) if sample_index is None else np.asarray(sample_index)
    w = StoreWriter.create(path, lay, si, SHAPES, dtypes, request={"test": 1}, provenance={"has_energy": True}, codec=codec)
    cum = np.concatenate([[0], np.cumsum(natoms)])
    for g in range(lay.num_groups):
        lo, hi = lay.group_atoms(g)
        rows = {k: np.zeros((hi - lo, *s), dtype=F.storage_dtype(dtypes[k])) for k, s in SHAPES.items()}
        for i in lay.group_samples(g):
            a = lay.atom_start[i] - lo
            for k in SHAPES:
                rows[k][a : a + natoms[i]] = F.to_storage(torch.from_numpy(values[k][cum[i] : cum[i + 1]]), dtypes[k])
        s = lay.group_samples(g)
        w.write_group(g, rows, energy[s.start : s.stop], hashes[s.start : s.stop])
    assert not FeatureStore(path, require_complete=False).complete
    w.finalize()
    return natoms, cum, values, energy, hashes, si


def _expected(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a float32 value becomes after storage in ``dtype`` and reading back as float32."""
    return F.bf16_bits_to_float32(F.to_storage(torch.from_numpy(x), dtype)) if dtype == "bfloat16" else x.astype(dtype).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_equals_written_values(tmp_path, dtype):
    path = tmp_path / "s.zarr"
    natoms, cum, values, energy, hashes, _ = _write_synthetic(path, dtype)
    store = FeatureStore.open(path)
    assert store.num_samples == len(natoms)
    assert store.feature_keys == (K.NODE, K.E2N, K.E2V, K.ATOM_ENERGY, K.FORCES, K.ENERGY)
    idx = [7, 0, 22, 7, 13, 3]  # any order, repeats allowed
    out = store.read(idx)
    for k in SHAPES:
        want = np.concatenate([values[k][cum[i] : cum[i + 1]] for i in idx])
        if k in F.HIDDEN_KEYS:
            want = _expected(want, dtype)
        assert out[k].dtype == torch.float32
        np.testing.assert_array_equal(out[k].numpy(), want, err_msg=k)
    np.testing.assert_array_equal(out[K.ENERGY].numpy(), energy[idx].astype(np.float32))
    assert out[K.NATOMS].tolist() == natoms[idx].tolist()
    assert out[K.NATOMS].dtype == torch.long
    np.testing.assert_array_equal(out["sample_hash"].numpy().view(np.uint64), hashes[idx])
    # uncompressed shards are served from memory maps
    assert set(store.map_kinds.values()) == {"mmap"}


def test_compressed_store_reads_the_same_through_zarr(tmp_path):
    natoms, cum, values, *_ = _write_synthetic(tmp_path / "z.zarr", "float16", codec="zstd")
    store = FeatureStore.open(tmp_path / "z.zarr")
    out = store.read([4, 1])
    want = np.concatenate([values[K.E2V][cum[i] : cum[i + 1]] for i in (4, 1)]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out[K.E2V].numpy(), want)
    assert set(store.map_kinds.values()) == {"zarr"}


def test_plain_zarr_reading_example(tmp_path):
    """The example of docs/store-format.md: a user with only zarr + numpy."""
    path = tmp_path / "s.zarr"
    natoms, cum, values, energy, *_ = _write_synthetic(path, "bfloat16")
    # --- as in the docs -----------------------------------------------------------------
    root = zarr.open_group(str(path), mode="r")
    attrs = root.attrs["kdcache"]
    assert attrs["complete"]
    row = int(np.flatnonzero(root["sample_index"][:] == 5)[0])  # store row of dataset sample 5
    start, n = int(root["atom_start"][row]), int(root["natoms"][row])
    node = root["node"][start : start + n]
    if root["node"].attrs["kdcache_dtype"] == "bfloat16":  # raw bits -> float32
        node = (node.astype(np.uint32) << 16).view(np.float32)
    e_sample = float(root["energy"][row])
    # ------------------------------------------------------------------------------------
    np.testing.assert_array_equal(node, _expected(values[K.NODE][cum[5] : cum[6]], "bfloat16"))
    assert e_sample == energy[5]


def test_noncontiguous_sample_index_and_unknown_index(tmp_path):
    si = np.arange(23) * 3 + 100
    natoms, cum, values, *_ = _write_synthetic(tmp_path / "s.zarr", "float32", sample_index=si)
    store = FeatureStore.open(tmp_path / "s.zarr")
    out = store.read([si[4], si[0]])
    want = np.concatenate([values[K.NODE][cum[i] : cum[i + 1]] for i in (4, 0)])
    np.testing.assert_array_equal(out[K.NODE].numpy(), want)
    assert out[K.SAMPLE_INDEX].tolist() == [si[4], si[0]]
    with pytest.raises(StoreError, match="sample 101 is not in the store"):
        store.read([101])


def test_incomplete_store_refused_and_pickles_lazily(tmp_path):
    rng = np.random.default_rng(0)
    lay = Layout.plan(rng.integers(1, 9, size=10), shard_atoms=16, chunk_atoms=8)
    dt = {K.NODE: "float16", K.ENERGY: "float32"}
    w = StoreWriter.create(tmp_path / "s.zarr", lay, np.arange(10), {K.NODE: (4,)}, dt, request={})
    g0 = lay.group_atoms(0)
    w.write_group(0, {K.NODE: np.ones((g0[1] - g0[0], 4), np.float16)}, np.zeros(len(lay.group_samples(0))),
                  np.zeros(len(lay.group_samples(0)), np.uint64))
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="not written yet"):
        w.finalize()
    assert not FeatureStore(tmp_path / "s.zarr", require_complete=False).complete
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "nothing.zarr")
    # a store handed to a DataLoader worker carries no open maps
    s = FeatureStore(tmp_path / "s.zarr", require_complete=False)
    s.read_rows([0])
    assert s._maps
    assert pickle.loads(pickle.dumps(s))._maps == {}


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_read_in_stored_precision(tmp_path, dtype, torch_dtype):
    natoms, cum, values, *_ = _write_synthetic(tmp_path / "s.zarr", dtype)
    store = FeatureStore.open(tmp_path / "s.zarr")
    out = store.read([3, 11], dtype=None)
    assert out[K.E2V].dtype == torch_dtype and out[K.FORCES].dtype == torch.float32
    want = _expected(np.concatenate([values[K.E2V][cum[i] : cum[i + 1]] for i in (3, 11)]), dtype)
    np.testing.assert_array_equal(out[K.E2V].float().numpy(), want)


def test_shard_with_absent_chunks_reads_as_zeros(tmp_path):
    """A shard written by another tool (zarr's default skips all-zero chunks) still reads right
    (in a format 1 store: in a checksummed one, a rewritten shard is refused as damaged)."""
    from .test_integrity import as_format_1

    path = tmp_path / "s.zarr"
    natoms, cum, values, *_ = _write_synthetic(path, "float32")
    as_format_1(path)
    arr = zarr.open_group(str(path), mode="r+")[K.NODE]  # default config: empty chunks skipped
    lo = 32  # shard 1
    block = np.asarray(arr[lo : lo + 32])
    block[8:16] = 0  # one inner chunk becomes all zero -> absent from the rewritten shard
    arr[lo : lo + 32] = block
    store = FeatureStore.open(path)
    rows = [r for r in range(store.num_samples) if lo <= store.atom_start[r] < lo + 32]
    out = store.read_rows(rows, keys=[K.NODE])
    want = np.concatenate([block[store.atom_start[r] - lo : store.atom_start[r] - lo + store.natoms[r]] for r in rows])
    np.testing.assert_array_equal(out[K.NODE].numpy(), want)
    assert store.map_kinds[(K.NODE, 1)] == "chunked"


def test_raw_shard_writer_matches_zarr_byte_for_byte(tmp_path, monkeypatch):
    """kdcache writes uncompressed shards itself (faster); the files must be zarr's own."""
    a = tmp_path / "fast.zarr"
    _write_synthetic(a, "bfloat16")
    monkeypatch.setattr(StoreWriter, "raw_shard_writes", False)  # zarr writes the reference
    b = tmp_path / "zarr.zarr"
    _write_synthetic(b, "bfloat16")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and "c" in p.relative_to(a).parts)
    assert files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # and plain zarr decodes them (CRC of the index checked)
    np.testing.assert_array_equal(zarr.open_group(str(a), mode="r")[K.E2V][:], zarr.open_group(str(b), mode="r")[K.E2V][:])


class _Targets(torch.utils.data.Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return self.store.num_samples

    def __getitem__(self, i):
        return self.store.read([i])[K.E2V]


def test_dataloader_workers_read_the_same(tmp_path):
    _write_synthetic(tmp_path / "s.zarr", "float16")
    store = FeatureStore.open(tmp_path / "s.zarr")
    store.read([0, 5])  # maps opened in the parent must not leak into workers
    want = [store.read([i])[K.E2V] for i in range(store.num_samples)]
    loader = torch.utils.data.DataLoader(_Targets(store), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = list(loader)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
