"""Streamed per-channel store statistics equal numpy's on the whole array, however split."""

import numpy as np
import pytest

from kdcache import keys as K
from kdcache.store.stats import RunningStats, Standardizer, merge_all


def _split(x, cuts):
    return [x[a:b] for a, b in zip([0] + cuts, cuts + [len(x)])]


@pytest.mark.parametrize("cuts", [[], [1], [3, 4, 40], [0, 10, 10, 63]])
def test_scalar_stats_merge_exactly(cuts):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 5)) * [1, 10, 100, 0.1, 0] + [0, 5, -300, 2, 7]).astype(np.float16)
    total = merge_all([RunningStats.of(K.NODE, p) for p in _split(x, cuts)])
    s = total.summary()
    x64 = x.astype(np.float64)
    assert s["count"] == 64
    np.testing.assert_allclose(s["mean"], x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s["std"], x64.std(0), rtol=1e-10, atol=1e-12)


def test_vector_stats_are_rms_norms_without_shift():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(30, 3, 4)) + 3.0  # a mean offset must not be removed
    total = merge_all([RunningStats.of(K.E2V, p) for p in _split(v, [7, 19])])
    rms = np.sqrt((np.linalg.norm(v, axis=1) ** 2).mean(0))
    np.testing.assert_allclose(total.summary()["rms"], rms, rtol=1e-12)
    st = Standardizer.from_summary(K.E2V, total.summary())
    assert np.all(st.shift == 0)
    # rotating every vector leaves the statistics unchanged
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = np.einsum("ij,njd->nid", q, v)
    np.testing.assert_allclose(RunningStats.of(K.E2V, rot).summary()["rms"], rms, rtol=1e-12)


def test_atom_energy_and_round_trip_and_dead_channels():
    e = np.array([1.0, 2.0, 4.0, 8.0])
    s = RunningStats.of(K.ATOM_ENERGY, e)
    assert s.summary()["mean"] == pytest.approx([3.75])
    assert s.summary()["std"] == pytest.approx([np.std(e)])
    back = RunningStats.from_arrays(K.ATOM_ENERGY, s.to_arrays())
    assert back.summary() == s.summary()
    st = Standardizer.from_summary(K.NODE, RunningStats.of(K.NODE, np.zeros((5, 2))).summary())
    assert list(st.scale) == [1.0, 1.0]  # constant channels are not divided by zero


def assert_stats_match_stored_arrays(path) -> None:
    """The statistics in a store's attributes equal numpy's over the stored (unpadded) rows."""
    import zarr

    from kdcache.store import FeatureStore
    from kdcache.store.format import bf16_bits_to_float32
    from kdcache.store.stats import STATS_KEYS

    store = FeatureStore.open(path)
    root = zarr.open_group(str(path), mode="r")
    stats = store.provenance["stats"]
    keys = [k for k in store.per_atom_keys if k in STATS_KEYS]
    assert keys and sorted(stats) == sorted(keys)
    for key in keys:
        raw = root[key][:]
        if store.dtypes[key] == "bfloat16":
            raw = bf16_bits_to_float32(raw)
        rows = np.concatenate([raw[a : a + n] for a, n in zip(store.atom_start, store.natoms)]).astype(np.float64)
        s = stats[key]
        assert s["count"] == int(store.natoms.sum())
        if s["kind"] == "vector":
            np.testing.assert_allclose(s["rms"], np.sqrt((np.linalg.norm(rows, axis=1) ** 2).mean(0)), rtol=1e-9)
        else:
            rows = rows.reshape(len(rows), -1)
            np.testing.assert_allclose(s["mean"], rows.mean(0), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(s["std"], rows.std(0), rtol=1e-9, atol=1e-12)


def test_extracted_store_statistics_equal_numpy(painn_ref_store):
    assert_stats_match_stored_arrays(painn_ref_store)
