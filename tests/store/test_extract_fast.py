"""`kdcache extract --fast`: a built-in teacher on its compiled path (kdcache.models.fast) stores
the eager values to float32 round-off, the store records it, a resume keeps it, and what the
compiled path cannot do (double backward, module hooks, foreign modules) is refused by name."""

import numpy as np
from typer.testing import CliRunner

from kdcache import keys as K
from kdcache.cli.main import app
from kdcache.store import FeatureStore

runner = CliRunner()


def _extract(data, out, *extra):
    return runner.invoke(app, ["extract", "--teacher", "painn-tiny", "--data", str(data), "--out", str(out),
                               "--dtype", "float32", "--batch-size", "4", "--no-progress", *extra])


def test_fast_extraction_stores_the_eager_values(mol_lmdb, tmp_path):
    assert _extract(mol_lmdb, tmp_path / "eager.zarr").exit_code == 0
    res = _extract(mol_lmdb, tmp_path / "fast.zarr", "--fast")
    assert res.exit_code == 0, res.output
    eager, fast = FeatureStore.open(tmp_path / "eager.zarr"), FeatureStore.open(tmp_path / "fast.zarr")
    idx = list(range(len(eager)))
    a, b = eager.read(idx), fast.read(idx)
    for k in (K.NODE, K.VECTOR, K.FORCES, K.ENERGY):
        scale = float(a[k].abs().max())
        assert scale > 0, k
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=0, atol=2e-5 * scale, err_msg=k)
    assert fast.provenance["request"]["fast"] is True and "fast" not in eager.provenance["request"]
    # the path decides the values: resuming the eager store with --fast is refused, naming it
    res = _extract(mol_lmdb, tmp_path / "eager.zarr", "--fast")
    assert res.exit_code == 1 and "fast" in res.output and "Traceback" not in res.output
    assert runner.invoke(app, ["store", "verify", str(tmp_path / "fast.zarr"), "--data", str(mol_lmdb)]).exit_code == 0
    # the default (auto) resumes each store with the path it records, without timing anything
    for name, path in (("on", "fast.zarr"), ("off", "eager.zarr")):
        res = _extract(mol_lmdb, tmp_path / path)
        assert res.exit_code == 0, res.output
        assert f"fast path: {name} (auto: kept from the store {tmp_path / path})" in res.output


def test_auto_compiles_where_the_eager_time_pays_for_it(mol_lmdb, tmp_path, monkeypatch):
    from kdcache.models import fast as F
    from kdcache.models import fast_auto as A

    # a short set stays eager and says nothing
    res = _extract(mol_lmdb, tmp_path / "short.zarr")
    assert res.exit_code == 0 and "fast path" not in res.output, res.output
    assert "fast" not in FeatureStore.open(tmp_path / "short.zarr").provenance["request"]
    # the same set, weighed as if each eager batch took 10^4 s: compiled, and the store says so
    made = []
    monkeypatch.setattr(A, "MIN_BATCHES", 1)
    monkeypatch.setattr(A, "eager_batch_seconds", lambda run, device: 1e4)
    monkeypatch.setattr(F, "fast_model", lambda m: made.append(m) or m)  # no compile in this test
    res = _extract(mol_lmdb, tmp_path / "slow.zarr")
    assert res.exit_code == 0, res.output
    assert "extract: fast path: on (auto: " in res.output and "ms eager" in res.output and made
    assert FeatureStore.open(tmp_path / "slow.zarr").provenance["request"]["fast"] is True
    # and what the compiled path cannot run stays eager under auto instead of being refused
    res = _extract(mol_lmdb, tmp_path / "h.zarr", "--hessian-probes", "1")
    assert res.exit_code == 0 and "fast path: off (auto: --hessian-probes" in res.output, res.output


def test_fast_refuses_what_the_compiled_path_cannot_do(mol_lmdb, tmp_path):
    res = _extract(mol_lmdb, tmp_path / "h.zarr", "--fast", "--hessian-probes", "2")
    assert res.exit_code == 1 and "--hessian-probes" in res.output and "--fast" in res.output
    res = _extract(mol_lmdb, tmp_path / "f.zarr", "--fast", "--feature", "node=message_layers.0")
    assert res.exit_code == 1 and "--feature" in res.output and "--fast" in res.output
    res = runner.invoke(app, ["extract", "--teacher", "py:tests.store.tiny_adapter:make", "--data", str(mol_lmdb),
                              "--out", str(tmp_path / "a.zarr"), "--fast", "--no-progress"])
    assert res.exit_code == 1 and "--fast" in res.output and "built-in" in res.output, res.output
    for r in (res,):
        assert "Traceback" not in r.output
    assert not (tmp_path / "h.zarr").exists() and not (tmp_path / "f.zarr").exists()
