"""`kdcache extract --hessian-probes K`: the stored Hessian-vector products are the teacher's
−∂F/∂x·v (checked against finite differences of its forces), for probes regenerated from the
sample index alone, and two ranks store the same values as one."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from kdcache import keys as K
from kdcache.data import open_dataset
from kdcache.errors import ConfigError
from kdcache.hessian import PROBE_RULE, check_probe_rule, describe, force_jacobian_products, probe_vectors
from kdcache.models.checkpoint import load_checkpoint
from kdcache.store import FeatureStore
from kdcache.store.extract import extract, set_teacher_dtype

from .conftest import LAYOUT, PAINN_ARGS, REPO, assert_stores_equal, make_checkpoint, painn_cli_args

PROBES = 2


@pytest.fixture(scope="module")
def schnet_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "schnet_tiny.pt", "schnet-tiny")


def test_probes_depend_on_the_sample_index_only():
    a = probe_vectors(7, 5, 3)
    assert a.shape == (5, 3, 3) and a.dtype == torch.float64
    assert torch.equal(a, probe_vectors(7, 5, 3))  # regenerated, never stored
    assert torch.equal(probe_vectors(7, 5, 2), a[..., :2])  # probe k is the same whatever K is
    assert not torch.allclose(probe_vectors(8, 5, 3), a)
    fixed = torch.tensor([True, False, False, True, False])
    b = probe_vectors(7, 5, 3, fixed)
    assert torch.all(b[fixed] == 0) and torch.equal(b[~fixed], a[~fixed])
    # stage two regenerates them only by the rule the store records
    assert check_probe_rule({"hessian": describe(3)}, "s.zarr") == 3
    with pytest.raises(ConfigError, match="s.zarr: its 'hvp' targets were made with probes 'v0'"):
        check_probe_rule({"hessian": {"probes": 3, "probes_from": "v0"}}, "s.zarr")


@pytest.mark.parametrize("teacher", ["schnet", "painn"])  # gradient forces; a direct force head
def test_stored_products_are_finite_differences_of_the_teachers_forces(teacher, schnet_ckpt, painn_ckpt,
                                                                      mol_lmdb, tmp_path):
    ckpt = {"schnet": schnet_ckpt, "painn": painn_ckpt}[teacher]
    out = tmp_path / "hvp.zarr"
    extract(mol_lmdb, out, checkpoint=str(ckpt), features=["outputs"], dtype="float32", label_dtype="float64",
            teacher_dtype="float64", batch_size=4, hessian_probes=PROBES, progress=False, **LAYOUT)
    store = FeatureStore.open(out)
    assert store.provenance["hessian"] == {"probes": PROBES, "probes_from": PROBE_RULE,
                                           "unit": store.provenance["hessian"]["unit"]}
    assert store.dtypes[K.HVP] == "float32"  # the feature dtype (--dtype)
    model = set_teacher_dtype(load_checkpoint(ckpt).model, "float64")
    assert model.gradient_forces == (teacher == "schnet")
    ds = open_dataset(mol_lmdb)
    h = 1e-4
    for i in (0, 5, 13):
        got = store.read([i])[K.HVP].double()
        sample = ds[i]
        v = probe_vectors(i, int(sample[K.NATOMS]), PROBES)
        fd = []
        for k in range(PROBES):
            forces = []
            for sign in (-1.0, 1.0):
                moved = sample.clone()
                moved[K.POSITIONS] = sample[K.POSITIONS].double() + sign * h * v[..., k]
                forces.append(model.predict(Batch.from_data_list([moved]))[K.FORCES].detach())
            fd.append((forces[0] - forces[1]) / (2 * h))  # −∂F/∂x·v
        fd = torch.stack(fd, dim=-1)
        assert float(fd.abs().max()) > 1e-2  # a product worth comparing
        np.testing.assert_allclose(got.numpy(), fd.numpy(), rtol=1e-5, atol=1e-5 * float(fd.abs().max()))
        if teacher == "painn":
            # a direct force head's Jacobian is not symmetric: its transpose's product is another
            # vector, so the comparison above tells J·v from Jᵀ·v
            batch = Batch.from_data_list([sample])
            pos = batch[K.POSITIONS].double().requires_grad_(True)
            batch[K.POSITIONS] = pos
            with torch.enable_grad():
                wrong = force_jacobian_products(model.predict(batch)[K.FORCES], pos, v, symmetric=True)
            assert not torch.allclose(wrong, fd, rtol=1e-2, atol=1e-3)


def test_two_gloo_ranks_store_the_same_products(mol_lmdb, painn_ckpt, tmp_path):
    one = tmp_path / "one.zarr"
    extract(mol_lmdb, one, checkpoint=str(painn_ckpt), progress=False, hessian_probes=PROBES, **PAINN_ARGS)
    two = tmp_path / "two.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kdcache.cli.main", *painn_cli_args(mol_lmdb, painn_ckpt, two), "--hessian-probes", str(PROBES)]
    # same intra-op threads as the one-rank run: the comparison is bit for bit
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = FeatureStore.open(two)
    assert store.provenance["extraction"]["world_size"] == 2
    assert_stores_equal(two, one)
    hvp = store.read(range(14))[K.HVP]
    assert hvp.shape[1:] == (3, PROBES) and float(hvp.abs().max()) > 0


def test_a_calculator_teacher_is_refused(mol_lmdb, tmp_path):
    from kdcache.teachers.calculator import CalculatorSpec

    with pytest.raises(ConfigError, match="--hessian-probes: needs a model teacher"):
        extract(mol_lmdb, tmp_path / "emt.zarr", teacher=CalculatorSpec.parse("ase:ase.calculators.emt:EMT"),
                hessian_probes=2, progress=False)
    with pytest.raises(ConfigError, match="--hessian-probes"):
        extract(mol_lmdb, tmp_path / "neg.zarr", teacher="schnet-tiny", hessian_probes=-1, progress=False)
