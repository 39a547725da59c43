"""The COLL "different" chain through the `kdcache` command on a tiny molecule file.

Extended XYZ as COLL publishes it (no cell, pbc "F F F", so every tag is 0): small molecules, a
lone atom and two atoms farther apart than the cutoff. A GemNet-OC teacher is trained on it
(`kdcache train --strategy none`), extracted (`kdcache extract`), a PaiNN student distilled from
the store with every COLL strategy (`kdcache train`) and both evaluated (`kdcache eval`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K

runner = CliRunner()

#: samples of the file: four water-like molecules, then a lone C, then a C–O pair 9 Å apart
#: (the tiny presets' cutoff is 6 Å), whose three atoms have no edge
LONE, PAIR = 4, 5
COMMON = ("--device", "cpu", "--no-progress")


def _invoke(*args: str):
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def write_coll(path):
    """A COLL-like extended XYZ file with energies and forces (ASE writes what COLL has)."""
    import ase.io
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(0)
    water = np.array([[0.0, 0.0, 0.12], [0.76, 0.0, -0.48], [-0.76, 0.0, -0.48]])
    structures = [([8, 1, 1], water + rng.normal(scale=0.05, size=(3, 3))) for _ in range(4)]
    structures += [([6], [[0.0, 0.0, 0.0]]), ([6, 8], [[0.0, 0.0, 0.0], [5.0, 6.0, -4.5]])]
    frames = []
    for numbers, positions in structures:
        atoms = Atoms(numbers=numbers, positions=positions, pbc=False)
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3)))
        frames.append(atoms)
    ase.io.write(str(path), frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    return write_coll(tmp_path_factory.mktemp("coll") / "coll.xyz")


@pytest.fixture(scope="module")
def teacher(coll):
    """A GemNet-OC teacher trained (two steps) on the molecules: its best.pt."""
    out = coll.parent / "teacher"
    _invoke("train", "--student", "gemnet-oc-tiny", "--data", str(coll), "--val", str(coll), "--strategy", "none",
            "--max-steps", "2", "--batch-size", "3", "--out", str(out), *COMMON)
    return out / "best.pt"


@pytest.fixture(scope="module")
def store(coll, teacher):
    out = coll.parent / "teacher.zarr"
    _invoke("extract", "--checkpoint", str(teacher), "--data", str(coll), "--out", str(out), "--batch-size", "4",
            "--dtype", "float32", *COMMON)
    return out


def test_extracted_targets_of_edgeless_atoms(coll, store):
    from kdcache.store import FeatureStore

    read = FeatureStore.open(store).read(range(6))
    assert read[K.NATOMS].tolist() == [3, 3, 3, 3, 1, 2]
    for key in (K.FORCES, K.ATOM_ENERGY, K.NODE, K.E2N, K.E2V):
        assert bool(np.isfinite(read[key].numpy()).all()), key
    edgeless = slice(12, 15)  # the lone C and the far pair
    for key in (K.FORCES, K.E2N, K.E2V):
        assert not bool(read[key][edgeless].any()), key
    assert read[K.FORCES][:12].abs().max() > 0  # the molecules do feel forces
    # an edgeless atom's energy is its element's constant: the lone C and the pair's C agree
    assert abs(float(read[K.ATOM_ENERGY][12] - read[K.ATOM_ENERGY][13])) < 1e-5
    assert abs(float(read[K.ENERGY][PAIR] - read[K.ATOM_ENERGY][13:15].sum())) < 1e-5
    assert abs(float(read[K.ENERGY][LONE] - read[K.ATOM_ENERGY][12])) < 1e-5


def test_student_distils_from_molecules_and_both_evaluate(coll, store, teacher):
    out = coll.parent / "student"
    _invoke("train", "--student", "painn-tiny", "--data", str(coll), "--val", str(coll), "--store", str(store),
            "--strategy", "n2n:1,e2n:1,v2v:1,vanilla1:1,vanilla2:1", "--max-steps", "2", "--batch-size", "3",
            "--out", str(out), *COMMON)
    for checkpoint in (out / "best.pt", teacher):
        res = _invoke("eval", str(checkpoint), "--data", str(coll), "--json", "--batch-size", "6", "--device", "cpu")
        metrics = json.loads(res.output.strip().splitlines()[-1])
        assert metrics["num_samples"] == 6
        assert all(math.isfinite(metrics[k]) for k in ("energy_mae", "force_mae", "force_cos"))
        assert metrics["energy_mae"] > 0 and -1 <= metrics["force_cos"] <= 1
