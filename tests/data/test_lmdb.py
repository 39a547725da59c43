"""OC20 LMDB: writer -> reader round trip, PyG 1.x pickles, folders, length key, batching."""

from __future__ import annotations

import pickle

import lmdb
import pytest
import torch
from torch_geometric.loader import DataLoader

from kdcache import keys as K
from kdcache.data import LmdbDataset, open_dataset, sample_hash
from kdcache.data.lmdb_dataset import shared_env
from kdcache.data.lmdb_writer import dumps_record, write_lmdb
from kdcache.data.sample import Sample

from .conftest import make_record


def _check_sample(s, rec, index):
    assert torch.equal(s[K.POSITIONS], rec["pos"].float())
    assert s[K.ATOMIC_NUMBERS].dtype == torch.long
    assert torch.equal(s[K.ATOMIC_NUMBERS], rec["atomic_numbers"].long())
    assert s[K.CELL].shape == (1, 3, 3) and torch.equal(s[K.CELL], rec["cell"].float())
    assert s[K.PBC].tolist() == [[True, True, True]]  # OC20 files carry no pbc: all periodic
    assert s[K.NATOMS].tolist() == [rec["natoms"]]
    assert torch.equal(s[K.TAGS], rec["tags"].long())
    assert s[K.FIXED].dtype == torch.bool and torch.equal(s[K.FIXED], rec["fixed"].bool())
    assert s[K.ENERGY].tolist() == [pytest.approx(rec["y"])]
    assert torch.equal(s[K.FORCES], rec["force"].float())
    assert s[K.SID].tolist() == [rec["sid"]] and s[K.FID].tolist() == [rec["fid"]]
    assert s[K.SAMPLE_INDEX].tolist() == [index]


@pytest.mark.parametrize("pyg1", [False, True])
def test_round_trip(tmp_path, pyg1):
    recs = [make_record(n=3 + i, seed=i) for i in range(5)]
    path = tmp_path / "one.lmdb"
    assert write_lmdb(path, recs, pyg1=pyg1) == 5
    ds = open_dataset(path)
    assert isinstance(ds, LmdbDataset) and len(ds) == 5
    for i, rec in enumerate(recs):
        _check_sample(ds[i], rec, i)
    assert ds.fingerprint() == {
        "kind": "lmdb", "num_samples": 5,
        "files": [{"name": "one.lmdb", "size": path.stat().st_size, "num_samples": 5}],
    }
    # no temporary or lock files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.lmdb"]


def test_written_values_are_real_pyg_pickles(tmp_path):
    """Files load with plain pickle + PyG as the Open Catalyst code does; PyG1 ones lack _store."""
    rec = make_record(seed=1)
    new, old = pickle.loads(dumps_record(rec)), pickle.loads(dumps_record(rec, pyg1=True))
    assert "_store" in new.__dict__ and torch.equal(new.pos, rec["pos"])
    assert "_store" not in old.__dict__
    assert old.__dict__["x"] is None and torch.equal(old.__dict__["force"], rec["force"])
    assert old.__dict__["y"] == rec["y"]


def test_writer_is_deterministic(tmp_path):
    recs = [make_record(seed=i) for i in range(3)]
    write_lmdb(tmp_path / "a.lmdb", recs)
    write_lmdb(tmp_path / "b.lmdb", [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in r.items()} for r in recs])
    assert (tmp_path / "a.lmdb").read_bytes() == (tmp_path / "b.lmdb").read_bytes()


def test_failed_write_leaves_nothing(tmp_path):
    def records():
        yield make_record()
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        write_lmdb(tmp_path / "x.lmdb", records())
    assert list(tmp_path.iterdir()) == []


def test_folder_global_index(tmp_path):
    sizes = [3, 1, 4]
    recs = [[make_record(seed=10 * f + i) for i in range(n)] for f, n in enumerate(sizes)]
    # names sort: data.0000 < data.0001 < data.0002; write out of order on purpose
    for f in (2, 0, 1):
        write_lmdb(tmp_path / f"data.{f:04d}.lmdb", recs[f], pyg1=(f == 1))
    (tmp_path / "notes.txt").write_text("not an lmdb")
    ds = open_dataset(tmp_path)
    assert len(ds) == 8 and [p.name for p in ds.paths] == [f"data.{f:04d}.lmdb" for f in range(3)]
    flat = [r for rs in recs for r in rs]
    for i, rec in enumerate(flat):
        _check_sample(ds[i], rec, i)
    assert ds[-1][K.SAMPLE_INDEX].item() == 7
    with pytest.raises(IndexError):
        ds[8]
    assert [f["num_samples"] for f in ds.fingerprint()["files"]] == sizes


def test_missing_length_key_falls_back_to_entry_count(tmp_path):
    recs = [make_record(seed=i) for i in range(4)]
    write_lmdb(tmp_path / "nolen.lmdb", recs, write_length=False)
    env = lmdb.open(str(tmp_path / "nolen.lmdb"), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"length") is None
    env.close()
    ds = LmdbDataset(tmp_path / "nolen.lmdb")
    assert len(ds) == 4
    _check_sample(ds[3], recs[3], 3)


def test_length_key_used(tmp_path):
    write_lmdb(tmp_path / "len.lmdb", [make_record(seed=i) for i in range(3)])
    with shared_env(tmp_path / "len.lmdb").begin() as txn:
        assert pickle.loads(txn.get(b"length")) == 3
    assert len(LmdbDataset(tmp_path / "len.lmdb")) == 3


def test_two_datasets_same_file(tmp_path):
    write_lmdb(tmp_path / "s.lmdb", [make_record()])
    a, b = open_dataset(tmp_path / "s.lmdb"), open_dataset(tmp_path)
    assert torch.equal(a[0].pos, b[0].pos)


def test_dataloader_with_workers(tmp_path):
    recs = [make_record(n=3 + (i % 4), seed=i) for i in range(10)]
    write_lmdb(tmp_path / "d0.lmdb", recs[:6])
    write_lmdb(tmp_path / "d1.lmdb", recs[6:], pyg1=True)
    ds = open_dataset(tmp_path)
    ds[0]  # open environments in the parent: forked workers must open their own
    seen = []
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    for batch in loader:
        s = batch.num_graphs
        assert batch[K.CELL].shape == (s, 3, 3) and batch[K.PBC].shape == (s, 3)
        assert batch[K.ENERGY].shape == (s,) and batch[K.NATOMS].shape == (s,)
        assert batch[K.SAMPLE_INDEX].shape == (s,)
        for j, idx in enumerate(batch[K.SAMPLE_INDEX].tolist()):
            # sample_index is NOT offset by PyG batching, and joins the right sample
            assert torch.equal(batch[K.POSITIONS][batch[K.BATCH] == j], recs[idx]["pos"])
            assert batch[K.ENERGY][j].item() == pytest.approx(recs[idx]["y"])
        seen += batch[K.SAMPLE_INDEX].tolist()
    assert sorted(seen) == list(range(10))


def test_sample_hash():
    from kdcache.data.sample import make_sample

    a = make_sample(make_record(seed=1), "x", 0)
    b = make_sample(make_record(seed=1), "y", 5)
    c = make_sample(make_record(seed=2), "x", 0)
    assert isinstance(sample_hash(a), int) and -(2**63) <= sample_hash(a) < 2**63
    assert sample_hash(a) == sample_hash(b) != sample_hash(c)
    moved = a.clone()
    moved.pos[0, 0] += 1e-4
    assert sample_hash(moved) != sample_hash(a)
    assert isinstance(a, Sample)


def test_reads_file_written_like_ocp_preprocessing(tmp_path):
    """Values from plain ``pickle.dumps(Data, protocol=-1)`` (torch's own tensor reduction), in
    both the OC20 S2EF naming (y/force, float Z) and fairchem's newer one (energy/forces, uint8 Z)."""
    from torch_geometric.data import Data

    path = tmp_path / "ocp.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26, meminit=False, map_async=True)
    rec = make_record(seed=4)
    newer = Data(pos=rec["pos"], atomic_numbers=rec["atomic_numbers"].to(torch.uint8), cell=rec["cell"],
                 natoms=4, tags=rec["tags"].int(), fixed=rec["fixed"].int(), energy=rec["y"],
                 forces=rec["force"], sid="random1004", edge_index=torch.zeros(2, 0, dtype=torch.long))
    for i, obj in enumerate([Data(**rec), newer]):
        with env.begin(write=True) as txn:
            txn.put(f"{i}".encode("ascii"), pickle.dumps(obj, protocol=-1))
    with env.begin(write=True) as txn:
        txn.put(b"length", pickle.dumps(2, protocol=-1))
    env.sync()
    env.close()
    ds = open_dataset(path)
    _check_sample(ds[0], rec, 0)
    s = ds[1]
    assert s[K.ATOMIC_NUMBERS].tolist() == rec["atomic_numbers"].long().tolist()
    assert s[K.ENERGY].item() == pytest.approx(rec["y"]) and torch.equal(s[K.FORCES], rec["force"])
    assert s[K.SID].tolist() == [1004] and s[K.FIXED].dtype == torch.bool
    assert K.EDGE_INDEX not in s  # stored graphs are ignored; graphs are built on the fly


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("pyg1", [False, True])
def test_every_pickle_protocol(protocol, pyg1):
    """Old writers may have used any protocol (0-2 spell globals in Python-2 names)."""
    from kdcache.data.safe_pickle import attributes_of, safe_loads
    from torch_geometric.data import Data

    rec = make_record(seed=protocol)
    if pyg1:
        obj = pickle.loads(dumps_record(rec, pyg1=True))  # a real PyG-1-style object
    else:
        obj = Data(**rec)
    attrs = attributes_of(safe_loads(pickle.dumps(obj, protocol=protocol), "f.lmdb", 0))
    assert set(attrs) == set(rec)
    assert torch.equal(attrs["pos"], rec["pos"]) and attrs["y"] == rec["y"]


def test_rewritten_file_is_reread(tmp_path):
    path = tmp_path / "r.lmdb"
    write_lmdb(path, [make_record(seed=1)])
    assert open_dataset(path)[0][K.ENERGY].item() == pytest.approx(-2.5)
    write_lmdb(path, [make_record(seed=2), make_record(seed=3)])
    ds = open_dataset(path)
    assert len(ds) == 2 and ds[0][K.ENERGY].item() == pytest.approx(-3.75)
