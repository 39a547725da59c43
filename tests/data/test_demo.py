"""Embedded EMT demo data: deterministic, OC20-like, and physically labelled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K
from kdcache.data import open_dataset
from kdcache.data.demo import METALS, write_demo

ADSORBATE_Z = {1, 6, 7, 8}
METAL_Z = {13, 28, 29, 46, 47, 78, 79}
assert {Atoms(m).numbers[0] for m in METALS} == METAL_Z


def test_files_and_sizes(demo_dir):
    for split, n in (("train", 24), ("val", 6), ("test", 6)):
        assert len(open_dataset(demo_dir / f"{split}.lmdb")) == n
    sids = {split: {int(s[K.SID]) for s in open_dataset(demo_dir / f"{split}.lmdb")} for split in ("train", "val", "test")}
    assert not (sids["train"] & sids["val"]) and not (sids["train"] & sids["test"])


def test_deterministic(tmp_path, demo_dir):
    """Same seed -> byte-identical files, also when labelled by 2 processes; other seed differs."""
    write_demo(tmp_path / "a", num_train=24, num_val=6, num_test=6, seed=3, workers=1)
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.lmdb").read_bytes() == (demo_dir / f"{split}.lmdb").read_bytes()
    write_demo(tmp_path / "b", num_train=30, num_val=1, num_test=1, seed=3, workers=2)
    par = open_dataset(tmp_path / "b" / "train.lmdb")
    ref = open_dataset(demo_dir / "train.lmdb")
    for i in range(len(ref)):  # the first frames are the same systems
        assert torch.equal(par[i][K.POSITIONS], ref[i][K.POSITIONS])
        assert torch.equal(par[i][K.FORCES], ref[i][K.FORCES])
    write_demo(tmp_path / "c", num_train=3, num_val=1, num_test=1, seed=4, workers=1)
    assert not torch.equal(open_dataset(tmp_path / "c" / "train.lmdb")[0][K.POSITIONS][:3],
                           ref[0][K.POSITIONS][:3])


def test_oc20_like(demo_dir):
    ds = open_dataset(demo_dir / "train.lmdb")
    metals, adsorbates = set(), set()
    for s in ds:
        n = int(s[K.NATOMS])
        assert 20 <= n <= 80
        tags, z = s[K.TAGS], s[K.ATOMIC_NUMBERS]
        assert set(tags.tolist()) == {0, 1, 2}
        assert torch.equal(s[K.FIXED], tags == 0)  # subsurface fixed, the rest free
        assert set(z[tags == 2].tolist()) <= ADSORBATE_Z and set(z[tags < 2].tolist()) <= METAL_Z
        assert len(set(z[tags < 2].tolist())) == 1  # one metal per slab
        metals |= set(z[tags < 2].tolist())
        adsorbates.add(tuple(sorted(z[tags == 2].tolist())))
        assert s[K.PBC].all()
        cell = s[K.CELL][0]
        assert cell[2, 2] > s[K.POSITIONS][:, 2].max() - s[K.POSITIONS][:, 2].min() + 8  # vacuum
        # positions wrapped into the cell (fractional coordinates in [0, 1))
        frac = torch.linalg.solve(cell.double().T, s[K.POSITIONS].double().T).T
        assert (frac > -1e-5).all() and (frac < 1 + 1e-5).all()
        # adsorbate above the surface
        assert s[K.POSITIONS][tags == 2, 2].min() > s[K.POSITIONS][tags == 1, 2].max() - 0.5
        f = s[K.FORCES]
        assert f.abs().max() < 25.0 and f[~s[K.FIXED]].norm(dim=1).max() > 0.05  # non-trivial
        assert 0.0 < s[K.ENERGY].item() / n < 2.0  # EMT eV per atom of a rattled slab
    assert len(metals) >= 3 and len(adsorbates) >= 3


def _atoms(s) -> Atoms:
    return Atoms(numbers=s[K.ATOMIC_NUMBERS].numpy(), positions=s[K.POSITIONS].double().numpy(),
                 cell=s[K.CELL][0].double().numpy(), pbc=s[K.PBC][0].numpy())


@pytest.mark.parametrize("index", [0, 5, 13])
def test_emt_forces_match_finite_differences(demo_dir, index):
    s = open_dataset(demo_dir / "train.lmdb")[index]
    atoms = _atoms(s)
    atoms.calc = EMT()
    # stored labels are EMT at the stored (float32) geometry
    assert s[K.ENERGY].item() == pytest.approx(atoms.get_potential_energy(), abs=2e-3)
    forces = atoms.get_forces()
    np.testing.assert_allclose(s[K.FORCES].numpy(), forces, atol=2e-3)
    # and EMT forces are minus the gradient of EMT energy: check a few components
    h = 1e-4
    rng = np.random.default_rng(index)
    for atom in [int(np.argmax(np.abs(forces).sum(1))), *rng.integers(len(atoms), size=2)]:
        for c in range(3):
            e = []
            for sign in (1, -1):
                a = atoms.copy()
                a.positions[atom, c] += sign * h
                a.calc = EMT()
                e.append(a.get_potential_energy())
            fd = -(e[0] - e[1]) / (2 * h)
            assert fd == pytest.approx(s[K.FORCES][atom, c].item(), abs=5e-3), (atom, c)


def test_demo_cli(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["data", "demo", str(out), "--num-train", "5", "--num-val", "2",
                                      "--num-test", "2", "--seed", "1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["test.lmdb", "train.lmdb", "val.lmdb"]
    assert len(open_dataset(out / "val.lmdb")) == 2


def test_demo_pool_is_unlabelled_and_of_other_systems(tmp_path):
    """`--num-pool M`: M structures of systems in no other split, with no energy and no forces
    (the structures a teacher labels); the labelled splits are the same as without it."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["data", "demo", str(out), "--num-train", "5", "--num-val", "2",
                                      "--num-test", "2", "--num-pool", "6", "--workers", "1"])
    assert result.exit_code == 0, result.output
    pool = open_dataset(out / "pool.lmdb")
    assert len(pool) == 6
    assert all(getattr(s, "energy", None) is None and getattr(s, "forces", None) is None for s in pool)
    sids = {split: {int(s[K.SID]) for s in open_dataset(out / f"{split}.lmdb")} for split in ("train", "val", "test")}
    assert not {int(s[K.SID]) for s in pool} & set().union(*sids.values())
    plain = tmp_path / "plain"
    assert CliRunner().invoke(app, ["data", "demo", str(plain), "--num-train", "5", "--num-val", "2",
                                    "--num-test", "2", "--workers", "1"]).exit_code == 0
    assert (plain / "train.lmdb").read_bytes() == (out / "train.lmdb").read_bytes()
    assert not (plain / "pool.lmdb").exists()
