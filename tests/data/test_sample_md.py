"""`kdcache data sample ... --md-steps K | --relax-steps K` with `--calculator ase:...` or `--model
CHECKPOINT`: each perturbed candidate moves under a calculator, frames are kept every M steps as
candidates (still through the minimum-distance filter), deterministic for a seed, with provenance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kdcache import keys as K
from kdcache.data import open_dataset
from kdcache.data.candidates import CandidateSettings, Driver, candidate_provenance, perturb, write_candidates

from .test_candidates import kdcache, write

EMT = "ase:ase.calculators.emt:EMT"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A Cu(111) slab (8 atoms) with its bottom layer fixed, and a CO molecule: EMT knows both."""
    from ase.build import fcc111, molecule
    from ase.constraints import FixAtoms

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 2))
    co = molecule("CO")
    co.set_cell(np.eye(3) * 8.0)
    co.center()
    co.pbc = False
    return write(tmp_path_factory.mktemp("md-seeds") / "seeds.lmdb", [slab, co], labelled=False)


def sample(seeds, out, *args):
    return kdcache("data", "sample", seeds, "--out", out, *args)


def raw_records(path) -> list:
    """The LMDB's records as written (with the fields the dataset does not hand out)."""
    import pickle

    from kdcache.data.lmdb_dataset import shared_env

    with shared_env(path).begin() as txn:  # a file this test wrote: plain unpickling
        return [pickle.loads(txn.get(str(i).encode())) for i in range(len(open_dataset(path)))]


def langevin_by_hand(seed_atoms, seed: int, index: int, calc, steps: int, every: int, temperature: float,
                     timestep: float = 1.0, rattle: float = 0.05) -> list[np.ndarray]:
    """The first candidate's frames of seed structure ``index``, run with ASE directly: the
    seed's generator draws the rattle, then the velocities and the thermostat's noise."""
    from ase import units
    from ase.md import velocitydistribution as velocities
    from ase.md.langevin import Langevin

    rng = np.random.default_rng([seed, index])
    atoms = perturb(seed_atoms, rng, rattle, 0.0)
    atoms.calc = calc
    (getattr(velocities, "thermalize_momenta", None) or velocities.MaxwellBoltzmannDistribution)(
        atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, timestep=timestep * units.fs, temperature_K=temperature, friction=0.01 / units.fs,
                   fixcm=False, rng=rng, logfile=None)
    frames = []
    for _ in range(steps // every):
        dyn.run(every)
        frames.append(atoms.get_positions().copy())
    return frames


def seed_atoms(seeds, i):
    from kdcache.data.atoms import sample_to_atoms

    return sample_to_atoms(open_dataset(seeds)[i])


def test_emt_md_frames_are_langevins_and_deterministic(seeds, tmp_path):
    from ase.calculators.emt import EMT as Emt

    a, b, c = tmp_path / "a.lmdb", tmp_path / "b.lmdb", tmp_path / "c.lmdb"
    args = ("--per-seed", 2, "--md-steps", 4, "--keep-every", 2, "--md-temperature", 600, "--calculator", EMT)
    for out, s in ((a, 3), (b, 3), (c, 4)):
        code, text, _ = sample(seeds, out, *args, "--seed", s)
        assert code == 0, text
    assert "wrote 8 candidates from 2 seed structures" in text and "0 MD/relaxation frames dropped" in text, text
    assert a.read_bytes() == b.read_bytes()  # the same seed, the same file
    assert not np.array_equal(open_dataset(a)[0][K.POSITIONS], open_dataset(c)[0][K.POSITIONS])
    ds, seed_ds = open_dataset(a), open_dataset(seeds)
    # 2 seeds x 2 starts x frames after steps 2 and 4, in that order
    assert [(r.seed_index, r.fid, r.dynamics_step) for r in raw_records(a)] == [
        (0, 0, 2), (0, 1, 4), (0, 2, 2), (0, 3, 4), (1, 0, 2), (1, 1, 4), (1, 2, 2), (1, 3, 4)]
    for i, first in ((0, 0), (1, 4)):  # each seed's first start, as ASE's Langevin under EMT runs it
        want = langevin_by_hand(seed_atoms(seeds, i), 3, i, Emt(), steps=4, every=2, temperature=600)
        for k in range(2):
            np.testing.assert_allclose(ds[first + k][K.POSITIONS].double().numpy(), want[k], atol=1e-5)
    fixed = seed_ds[0][K.FIXED].numpy()
    assert fixed.sum() == 4
    for j in range(4):  # the slab's fixed layer stays; its other atoms move between frames
        np.testing.assert_allclose(ds[j][K.POSITIONS][fixed], seed_ds[0][K.POSITIONS][fixed], atol=1e-6)
    assert np.abs((ds[1][K.POSITIONS] - ds[0][K.POSITIONS]).numpy()[~fixed]).max() > 1e-3
    p = candidate_provenance(a)
    assert p["settings"] == {"per_seed": 2, "rattle": 0.05, "strain": 0.0, "min_distance": 0.5, "seed": 3,
                             "attempts": 10, "md_steps": 4, "md_temperature": 600.0, "md_timestep": 1.0,
                             "md_friction": 0.01, "keep_every": 2}
    import ase

    dyn = p["dynamics"]
    assert (dyn["kind"], dyn["name"], dyn["kwargs"], dyn["calculator"]) == (
        "ase_calculator", EMT, {}, "ase.calculators.emt.EMT")
    assert dyn["version"] == ase.__version__ and len(dyn["module_sha256"]) == 64
    assert p["counts"] == {"seed_structures": 2, "candidates": 8, "rejected_draws": 0, "rejected_frames": 0,
                           "seeds_short": []}


@pytest.mark.parametrize("optimizer", ["FIRE", "BFGS"])
def test_relaxation_lowers_emts_energy(seeds, tmp_path, optimizer):
    from ase.calculators.emt import EMT as Emt

    from kdcache.data.atoms import sample_to_atoms

    starts, relaxed = tmp_path / "starts.lmdb", tmp_path / "relaxed.lmdb"
    base = ("--per-seed", 2, "--rattle", 0.15, "--seed", 5)
    assert sample(seeds, starts, *base)[0] == 0
    code, text, _ = sample(seeds, relaxed, *base, "--relax-steps", 8, "--relax-optimizer", optimizer,
                           "--calculator", EMT)
    assert code == 0 and "wrote 4 candidates" in text, text
    calc = Emt()

    def emt(sample):
        atoms = sample_to_atoms(sample)
        atoms.calc = calc
        return atoms.get_potential_energy(), np.abs(atoms.get_forces()).max()

    # a relaxation draws no random numbers: its starts are the plain candidates of the same seed
    for s, r in zip(open_dataset(starts), open_dataset(relaxed)):
        (e0, f0), (e1, f1) = emt(s), emt(r)
        assert e1 < e0 - 1e-3 and f1 < f0 / 2, (e0, e1, f0, f1)
    assert candidate_provenance(relaxed)["settings"]["relax_optimizer"] == optimizer


def test_md_with_a_kdcache_checkpoint(seeds, tmp_path):
    from kdcache.calculator import KDCacheCalculator
    from kdcache.models.checkpoint import load_checkpoint

    from ..store.conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "schnet.pt", "schnet-tiny")
    out = tmp_path / "model.lmdb"
    code, text, _ = sample(seeds, out, "--per-seed", 1, "--md-steps", 2, "--keep-every", 1, "--md-temperature",
                           300, "--md-timestep", 0.5, "--model", ckpt, "--device", "cpu", "--seed", 2)
    assert code == 0 and "wrote 4 candidates" in text, text
    want = langevin_by_hand(seed_atoms(seeds, 0), 2, 0, KDCacheCalculator(load_checkpoint(ckpt).model), steps=2,
                            every=1, temperature=300, timestep=0.5)
    ds = open_dataset(out)
    for k in range(2):
        np.testing.assert_allclose(ds[k][K.POSITIONS].double().numpy(), want[k], atol=1e-5)
    assert candidate_provenance(out)["dynamics"] == {
        "kind": "kdcache_model", "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(), "model": "schnet"}


def squeeze():
    """A toy ASE calculator that pulls every atom to the centroid (E = Σ |r_i - c|²)."""
    from ase.calculators.calculator import Calculator

    class Squeeze(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            super().calculate(atoms, properties, system_changes)
            d = self.atoms.get_positions() - self.atoms.get_positions().mean(axis=0)
            self.results = {"energy": float((d * d).sum()), "forces": -2.0 * d}

    return Squeeze()


def test_frames_pass_the_minimum_distance_filter(seeds, tmp_path):
    co = write(tmp_path / "co.lmdb", [seed_atoms(seeds, 1)], labelled=False)
    out = tmp_path / "squeezed.lmdb"
    settings = CandidateSettings(per_seed=1, rattle=0.01, min_distance=0.9, relax_steps=12, keep_every=1,
                                 relax_fmax=0.0)
    meta = write_candidates(co, out, settings, driver=Driver(squeeze(), {"kind": "test"}))
    # CO (1.13 Å) is squeezed together: the frames closer than 0.9 Å are dropped, the others kept
    distances = [float(np.linalg.norm(np.diff(s[K.POSITIONS].double().numpy(), axis=0))) for s in open_dataset(out)]
    assert distances and min(distances) >= 0.9 and len(distances) == meta["counts"]["candidates"]
    assert meta["counts"]["rejected_frames"] == 12 - len(distances) > 0
    assert meta["dynamics"] == {"kind": "test"}


@pytest.mark.parametrize("args, message", [
    (("--md-steps", 3), "--md-steps/--relax-steps need a calculator to move the atoms"),
    (("--calculator", EMT), "--calculator/--model moves the candidates in MD or a relaxation: give --md-steps"),
    (("--md-steps", 2, "--relax-steps", 2, "--calculator", EMT), "--md-steps and --relax-steps: choose one"),
    (("--md-steps", 2, "--keep-every", 3, "--calculator", EMT), "--keep-every 3 is more than the 2 steps"),
    (("--relax-steps", 2, "--relax-optimizer", "LBFGS", "--calculator", EMT),
     "--relax-optimizer must be one of FIRE, BFGS, got LBFGS"),
    (("--md-steps", 2, "--calculator", "ase:ase.calculators.emt"), "--calculator 'ase:ase.calculators.emt': expected"),
    (("--md-steps", 2, "--calculator", EMT, "--model", "x.pt"), "--calculator and --model: give one"),
], ids=["no-calculator", "no-steps", "both", "keep-every", "optimizer", "spec", "calculator-and-model"])
def test_bad_dynamics_settings_are_named(seeds, tmp_path, args, message):
    out = tmp_path / "bad.lmdb"
    code, text, errors = sample(seeds, out, *args)
    assert code == 1 and len(errors) == 1 and message in errors[0], text
    assert not out.exists()


def test_a_calculator_failure_names_the_seed(tmp_path):
    from ase import Atoms

    feo = write(tmp_path / "fe.lmdb", [Atoms("FeO", positions=[[0, 0, 0], [0, 0, 1.8]], cell=np.eye(3) * 8)],
                labelled=False)
    out = tmp_path / "fe-out.lmdb"
    code, text, errors = sample(feo, out, "--md-steps", 2, "--calculator", EMT)
    assert code == 1 and errors == [f"error: file {feo}, sample 0: the calculator of the MD/relaxation failed on a "
                                    "candidate of this seed: NotImplementedError: No EMT-potential for Fe"], text
    assert not out.exists()
