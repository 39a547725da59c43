"""Reading a store imports no model, no teacher and not the extraction; a store without the
teacher's energies serves none (never zeros)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kdcache import keys as K
from kdcache.errors import DataError
from kdcache.store import FeatureStore, Layout, StoreWriter

#: what a process that only reads stores must not load
FORBIDDEN = ("kdcache.models", "kdcache.teachers", "kdcache.store.extract", "kdcache.train", "kdcache.pipeline")


@pytest.mark.parametrize("module", ["kdcache.store.reader", "kdcache.store.verify", "kdcache.store"])
def test_reading_a_store_imports_no_model_code(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = [m for m in json.loads(out) if m.startswith(FORBIDDEN)]
    assert loaded == [], f"import {module} loads {loaded}"
    assert module in json.loads(out)


def _store_without_outputs(path):
    natoms = np.array([3, 2, 4])
    lay = Layout.plan(natoms, shard_atoms=16, chunk_atoms=8)
    dtypes = {K.NODE: "float32", K.ENERGY: "float32"}
    w = StoreWriter.create(path, lay, np.arange(3), {K.NODE: (4,)}, dtypes, request={}, provenance={"has_energy": False})
    lo, hi = lay.group_atoms(0)
    w.write_group(0, {K.NODE: np.ones((hi - lo, 4), dtype=np.float32)}, np.zeros(3), np.arange(3, dtype=np.uint64))
    w.finalize()
    return path


def test_a_store_without_energies_serves_none(tmp_path):
    store = FeatureStore.open(_store_without_outputs(tmp_path / "s.zarr"))
    assert not store.has_energy and store.energy is None and store.feature_keys == (K.NODE,)
    got = store.read([2, 0])
    assert K.ENERGY not in got and got[K.NODE].shape == (7, 4) and got[K.NATOMS].tolist() == [4, 3]
    # training that needs the teacher's energy is refused, naming the store and the key
    from kdcache.data.sample import make_sample
    from kdcache.train.data import JoinedDataset

    samples = [make_sample({"pos": np.zeros((n, 3)) + np.arange(n)[:, None], "atomic_numbers": [1] * n,
                            "cell": np.zeros((3, 3))}, "mem", i) for i, n in enumerate((3, 2, 4))]
    joined = JoinedDataset(samples, store, store_keys=(K.ENERGY,), check_hash=False)
    with pytest.raises(DataError, match=r"s\.zarr, field 'energy': target missing from the store"):
        joined[1]
