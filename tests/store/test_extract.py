"""`kdcache extract` with real (tiny) teachers: stored values, provenance, refusals, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch
from typer.testing import CliRunner

from kdcache import keys as K
from kdcache.errors import ConfigError, StoreError
from kdcache.models.checkpoint import file_sha256, load_checkpoint
from kdcache.data import open_dataset
from kdcache.store import FeatureStore
from kdcache.store.extract import extract, set_teacher_dtype
from kdcache.store.writer import StoreWriter

from .conftest import LAYOUT, crash_on_group_write, PAINN_ARGS, assert_stores_equal


@pytest.fixture(scope="module")
def gemnet_store(tmp_path_factory, mol_lmdb, gemnet_ckpt):
    out = tmp_path_factory.mktemp("gem") / "gemnet.zarr"
    extract(mol_lmdb, out, checkpoint=str(gemnet_ckpt), dtype="float32", label_dtype="float64", batch_size=8,
            progress=False, shard_atoms=64, chunk_atoms=8)
    return out


def test_gemnet_store_equals_teacher_predict(gemnet_store, mol_lmdb, gemnet_ckpt):
    store = FeatureStore.open(gemnet_store)
    assert set(store.feature_keys) == {K.NODE, K.E2N, K.E2V, K.ATOM_ENERGY, K.FORCES, K.ENERGY}
    ds = open_dataset(mol_lmdb)
    teacher = set_teacher_dtype(load_checkpoint(gemnet_ckpt).model, "float32")
    idx = [9, 2, 5, 0, 13]
    got = store.read(idx)
    want = teacher.predict(Batch.from_data_list([ds[i] for i in idx]), [K.NODE, K.E2N, K.E2V])
    for k in (K.NODE, K.E2N, K.E2V, K.ATOM_ENERGY, K.FORCES, K.ENERGY):
        np.testing.assert_allclose(got[k].numpy(), want[k].detach().float().numpy(), rtol=1e-5, atol=1e-5, err_msg=k)
    assert got[K.E2V].shape == (int(sum(ds[i][K.NATOMS] for i in idx)), 3, 48)
    # physical units: the checkpoint's normaliser (mean -3.5, std 2) was applied, and per-atom
    # energies sum to the energy
    raw = teacher(Batch.from_data_list([ds[i] for i in idx]))
    np.testing.assert_allclose(got[K.ENERGY].numpy(), raw[K.ENERGY].detach().numpy() * 2 - 3.5, rtol=1e-5, atol=1e-5)
    sums = torch.zeros(len(idx)).index_add_(0, torch.repeat_interleave(torch.arange(len(idx)), got[K.NATOMS]), got[K.ATOM_ENERGY])
    np.testing.assert_allclose(sums.numpy(), got[K.ENERGY].numpy(), rtol=1e-5, atol=1e-4)
    # the join key: each stored sample's hash is the dataset's
    from kdcache.data.sample import sample_hash

    assert got["sample_hash"].tolist() == [sample_hash(ds[i]) for i in idx]


def test_provenance(gemnet_store, mol_lmdb, gemnet_ckpt):
    store = FeatureStore.open(gemnet_store, dataset=open_dataset(mol_lmdb))
    p = store.provenance
    assert p["complete"] and p["complete_ranges"] == [[0, 14]]
    t = p["teacher"]
    assert t["name"] == "gemnet_oc" and t["checkpoint_sha256"] == file_sha256(gemnet_ckpt)
    assert t["config"]["emb_size_edge"] == 48 and t["normalizer"]["energy_mean"] == -3.5
    assert p["graph"]["cutoff"] == 6.0 and p["graph"]["max_neighbors"] == 30
    assert p["dataset"]["num_samples"] == 14 and len(p["dataset"]["sample_hashes_sha256"]) == 64
    assert p["dtypes"] == {K.NODE: "float32", K.E2N: "float32", K.E2V: "float32", K.ATOM_ENERGY: "float64",
                           K.FORCES: "float64", K.ENERGY: "float64"}
    assert p["units"][K.FORCES] == "eV/Å" and p["kdcache_version"]
    assert not p["warnings"]


def test_feature_choice_errors(mol_lmdb, painn_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="vector"):
        extract(mol_lmdb, tmp_path / "a.zarr", checkpoint=str(painn_ckpt), features=["e2v"], progress=False)
    with pytest.raises(ConfigError, match="cannot give"):
        extract(mol_lmdb, tmp_path / "b.zarr", teacher="schnet-tiny", features=["node", "e2n"], progress=False)
    with pytest.raises(ConfigError, match="holds a painn model"):
        extract(mol_lmdb, tmp_path / "c.zarr", teacher="gemnet-oc", checkpoint=str(painn_ckpt), progress=False)
    assert not any(tmp_path.iterdir())


def test_random_teacher_is_allowed_but_flagged(mol_lmdb, tmp_path):
    out = tmp_path / "r.zarr"
    extract(mol_lmdb, out, teacher="schnet-tiny", limit=4, batch_size=2, progress=False, **LAYOUT)
    store = FeatureStore.open(out)
    assert store.num_samples == 4 and store.feature_keys == (K.NODE, K.ATOM_ENERGY, K.FORCES, K.ENERGY)
    assert store.provenance["teacher"]["checkpoint"] is None
    assert "RANDOMLY INITIALISED" in store.provenance["warnings"][0]
    with pytest.raises(StoreError, match="sample 4 is not in the store"):
        store.read([4])


def test_mismatch_refused_unless_overwrite(painn_ref_store, mol_lmdb, other_lmdb, gemnet_ckpt, tmp_path):
    import shutil

    out = tmp_path / "s.zarr"
    shutil.copytree(painn_ref_store, out)
    with pytest.raises(StoreError, match="different settings.*teacher"):
        extract(mol_lmdb, out, checkpoint=str(gemnet_ckpt), progress=False, **PAINN_ARGS)
    with pytest.raises(StoreError, match="different settings.*batch_size"):
        extract(mol_lmdb, out, checkpoint=str(load_painn_path(painn_ref_store)), progress=False,
                **{**PAINN_ARGS, "batch_size": 5})
    # other structures in a file of the same name, size and count pass the cheap fingerprint
    # check at open; `verify` compares every sample's hash and finds them all different
    ds_other = open_dataset(other_lmdb)
    assert ds_other.fingerprint() == open_dataset(mol_lmdb).fingerprint()
    FeatureStore.open(out, dataset=ds_other)
    from kdcache.store.verify import verify_store

    rep = verify_store(out, ds_other)
    assert rep.fingerprint_ok and rep.hash_mismatches == list(range(14)) and not rep.ok
    assert "14 DIFFER" in "\n".join(rep.lines())
    assert verify_store(out, open_dataset(mol_lmdb)).ok
    # --overwrite replaces it
    extract(mol_lmdb, out, teacher="schnet-tiny", limit=3, overwrite=True, progress=False, **LAYOUT)
    assert FeatureStore.open(out).provenance["teacher"]["name"] == "schnet"


def load_painn_path(store_path) -> str:
    return FeatureStore.open(store_path).provenance["teacher"]["checkpoint"]


def test_fingerprint_mismatch_refused(painn_ref_store, tmp_path):
    from .conftest import write_molecules

    bigger = write_molecules(tmp_path / "more.lmdb", n=20, seed=0)
    with pytest.raises(StoreError, match="not extracted from this dataset"):
        FeatureStore.open(painn_ref_store, dataset=open_dataset(bigger))


def test_crash_then_resume_equals_uninterrupted(painn_ref_store, mol_lmdb, painn_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    restore = crash_on_group_write(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(mol_lmdb, out, checkpoint=str(painn_ckpt), progress=False, **PAINN_ARGS)
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(out)
    assert StoreWriter.open(out).attrs["complete_ranges"]  # partial ranges recorded
    restore()
    res = extract(mol_lmdb, out, checkpoint=str(painn_ckpt), progress=False, **PAINN_ARGS)
    assert res.resumed and res.groups_written == StoreWriter.open(out).layout.num_groups - 2
    assert_stores_equal(out, painn_ref_store)
    # a finished store: the same command does nothing
    assert extract(mol_lmdb, out, checkpoint=str(painn_ckpt), progress=False, **PAINN_ARGS).groups_written == 0


def test_cli_info_and_verify(painn_ref_store, mol_lmdb, tmp_path):
    from kdcache.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["store", "info", str(painn_ref_store), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["complete"] and d["num_samples"] == 14 and d["teacher"]["name"] == "painn"
    assert d["arrays"]["vector"]["shape"][1:] == [3, 32] and d["arrays"]["vector"]["dtype"] == "float16"
    r = runner.invoke(app, ["store", "info", str(painn_ref_store)])
    assert r.exit_code == 0 and "complete    yes" in r.stdout
    r = runner.invoke(app, ["store", "verify", str(painn_ref_store), "--data", str(mol_lmdb)])
    assert r.exit_code == 0 and r.stdout.strip().endswith("OK"), r.output
    r = runner.invoke(app, ["store", "info", str(tmp_path / "missing.zarr")])
    assert r.exit_code == 1 and "no feature store" in r.output
