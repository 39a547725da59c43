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
