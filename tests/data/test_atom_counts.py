"""Atom counts for planning a store, without decoding every sample: an LMDB written by kdcache
records them, an Open Catalyst LMDB (without them) is decoded, an ASE file counts them once."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest

from kdcache.data import open_dataset
from kdcache.data import sample as sample_mod
from kdcache.data.lmdb_writer import NATOMS_KEY, write_lmdb
from kdcache.errors import DataError

from .conftest import make_record

SIZES = [4, 7, 2, 5]


@pytest.fixture
def decoded(monkeypatch):
    """The dataset indices decoded into samples (every reader builds them with make_sample)."""
    seen: list[int] = []
    real = sample_mod.make_sample

    def counting(attrs, path, index):
        seen.append(index)
        return real(attrs, path, index)

    for module in ("kdcache.data.lmdb_dataset", "kdcache.data.coll"):
        monkeypatch.setattr(f"{module}.make_sample", counting)
    return seen


def _lmdb(tmp_path, name="a.lmdb", sizes=SIZES):
    path = tmp_path / name
    write_lmdb(path, [make_record(n, seed=i) for i, n in enumerate(sizes)])
    return path


def test_kdcache_lmdb_counts_are_read_not_decoded(tmp_path, decoded):
    ds = open_dataset(_lmdb(tmp_path))
    assert ds.atom_counts().tolist() == SIZES and ds.atom_counts(2).tolist() == SIZES[:2]
    assert decoded == []
    assert [int(ds[i]["natoms"][0]) for i in range(len(ds))] == SIZES  # what decoding would say


def test_open_catalyst_lmdb_without_counts_is_decoded(tmp_path, decoded):
    path = _lmdb(tmp_path)
    with lmdb.open(str(path), subdir=False, lock=False) as env, env.begin(write=True) as txn:
        txn.delete(NATOMS_KEY)  # as Open Catalyst writes them: records and a length only
    ds = open_dataset(path)
    assert ds.atom_counts(3).tolist() == SIZES[:3] and decoded == [0, 1, 2]


def test_folder_of_lmdbs_mixes_both(tmp_path, decoded):
    _lmdb(tmp_path, "a.lmdb", [3, 4])
    with lmdb.open(str(_lmdb(tmp_path, "b.lmdb", [6, 2, 5])), subdir=False, lock=False) as env, \
            env.begin(write=True) as txn:
        txn.delete(NATOMS_KEY)
    assert open_dataset(tmp_path).atom_counts().tolist() == [3, 4, 6, 2, 5] and decoded == [2, 3, 4]


def test_counts_that_do_not_cover_the_file_are_refused(tmp_path):
    path = _lmdb(tmp_path)
    with lmdb.open(str(path), subdir=False, lock=False) as env, env.begin(write=True) as txn:
        txn.put(NATOMS_KEY, np.asarray(SIZES[:3], dtype="<i8").tobytes())
    with pytest.raises(DataError, match="records 3 atom counts for 4 samples"):
        open_dataset(path).atom_counts()


def test_an_empty_structure_is_named_by_its_sample(tmp_path):
    import torch

    recs = [make_record(3), make_record(3, pos=torch.zeros(0, 3), natoms=0, atomic_numbers=torch.zeros(0),
                                        tags=torch.zeros(0), fixed=torch.zeros(0), force=torch.zeros(0, 3))]
    write_lmdb(tmp_path / "e.lmdb", recs)
    with pytest.raises(DataError, match="sample 1, field 'pos': empty structure"):
        open_dataset(tmp_path / "e.lmdb").atom_counts()


def test_ase_file_counts_once(coll_file, decoded):
    ds = open_dataset(coll_file)
    assert ds.atom_counts().tolist() == [3, 2] and decoded == []
