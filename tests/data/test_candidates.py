"""`kdcache data sample SEED --out NEW.lmdb`: rattled and strained candidates of a seed set,
periodic-aware minimum-distance filter, deterministic for a seed, unlabelled, with provenance."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K
from kdcache.data import open_dataset
from kdcache.data.candidates import candidate_provenance


def kdcache(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output, [line for line in res.output.splitlines() if line.startswith("error:")]


def write(path, frames, labelled=True):
    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    rng = np.random.default_rng(0)
    write_lmdb(path, [atoms_to_record(a, energy=float(rng.normal()) if labelled else None,
                                      forces=rng.normal(size=(len(a), 3)) if labelled else None, sid=100 + i)
                      for i, a in enumerate(frames)])
    return path


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A labelled seed set: a Cu(111) slab with its bottom layer fixed, and a water molecule."""
    from ase.build import fcc111, molecule
    from ase.constraints import FixAtoms

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    water = molecule("H2O")
    water.set_cell(np.eye(3) * 8.0)
    water.center()
    water.pbc = False
    return write(tmp_path_factory.mktemp("seeds") / "seeds.lmdb", [slab, water])


def sample(seeds, out, *args):
    return kdcache("data", "sample", seeds, "--out", out, *args)


def test_rattles_keep_fixed_atoms_and_drop_labels(seeds, tmp_path):
    out = tmp_path / "cand.lmdb"
    code, text, _ = sample(seeds, out, "--per-seed", 3, "--rattle", 0.1, "--seed", 4)
    assert code == 0 and "wrote 6 candidates from 2 seed structures" in text, text
    seed_ds, ds = open_dataset(seeds), open_dataset(out)
    assert len(ds) == 6
    moves = []
    for j in range(6):
        c, s = ds[j], seed_ds[j // 3]
        assert K.ENERGY not in c and K.FORCES not in c  # ready to be labelled by a teacher
        assert int(c[K.SID]) == 100 + j // 3 and int(c[K.FID]) == j % 3
        assert c[K.ATOMIC_NUMBERS].tolist() == s[K.ATOMIC_NUMBERS].tolist()
        assert c[K.TAGS].tolist() == s[K.TAGS].tolist() and c[K.FIXED].tolist() == s[K.FIXED].tolist()
        assert c[K.PBC].tolist() == s[K.PBC].tolist() and np.array_equal(c[K.CELL], s[K.CELL])  # no strain asked
        d = (c[K.POSITIONS] - s[K.POSITIONS]).double().numpy()
        fixed = s[K.FIXED].numpy()
        assert np.abs(d[fixed]).max(initial=0) < 1e-6  # fixed atoms stay (float32 round trip)
        moves.append(d[~fixed])
    assert int(seed_ds[0][K.FIXED].sum()) == 4  # the slab's bottom layer: there were fixed atoms to keep
    std = np.concatenate(moves).std()
    assert 0.07 < std < 0.13, std  # Gaussian, sigma 0.1 Å, ~100 coordinates
    assert not np.allclose(moves[0], moves[1])  # candidates of one seed differ


def test_strain_deforms_cell_and_positions_alike(seeds, tmp_path):
    out = tmp_path / "strain.lmdb"
    code, text, _ = sample(seeds, out, "--per-seed", 2, "--rattle", 0, "--strain", 0.03)
    assert code == 0, text
    seed, cand = open_dataset(seeds)[0], open_dataset(out)[0]
    cell0, cell1 = seed[K.CELL][0].double().numpy(), cand[K.CELL][0].double().numpy()
    deform = np.linalg.solve(cell0, cell1)  # cell1 = cell0 @ D
    assert np.allclose(deform, deform.T, atol=1e-5)  # a symmetric strain
    eps = deform - np.eye(3)
    assert 1e-3 < np.abs(eps).max() <= 0.03 + 1e-5
    p0, p1 = seed[K.POSITIONS].double().numpy(), cand[K.POSITIONS].double().numpy()
    np.testing.assert_allclose(p1 - p1.mean(0), (p0 - p0.mean(0)) @ deform, atol=1e-4)


def test_deterministic_for_a_seed(seeds, tmp_path):
    a, b, c = tmp_path / "a.lmdb", tmp_path / "b.lmdb", tmp_path / "c.lmdb"
    for out, s in ((a, 7), (b, 7), (c, 8)):
        code, text, _ = sample(seeds, out, "--per-seed", 2, "--strain", 0.02, "--seed", s)
        assert code == 0, text
    assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(open_dataset(a)[0][K.POSITIONS], open_dataset(c)[0][K.POSITIONS])


def test_provenance(seeds, tmp_path):
    out = tmp_path / "p.lmdb"
    code, text, _ = sample(seeds, out, "--per-seed", 2, "--rattle", 0.02, "--min-distance", 0.8, "--seed", 3)
    assert code == 0, text
    p = candidate_provenance(out)
    assert p["seed_data"]["files"] == [{"path": str(seeds.resolve()), "size": seeds.stat().st_size,
                                        "sha256": hashlib.sha256(seeds.read_bytes()).hexdigest()}]
    assert p["seed_data"]["fingerprint"] == open_dataset(seeds).fingerprint()
    assert p["settings"] == {"per_seed": 2, "rattle": 0.02, "strain": 0.0, "min_distance": 0.8, "seed": 3,
                             "attempts": 10}
    assert p["counts"] == {"seed_structures": 2, "candidates": 4, "rejected_draws": 0, "seeds_short": []}
    assert candidate_provenance(seeds) is None


def test_minimum_distance_sees_periodic_images(tmp_path):
    from ase import Atoms

    # 0.9 Å apart only through the periodic boundary (4.1 Å inside the cell)
    pair = dict(symbols="CuCu", positions=[[0.1, 2.5, 2.5], [4.2, 2.5, 2.5]], cell=np.eye(3) * 5.0)
    periodic = write(tmp_path / "periodic.lmdb", [Atoms(pbc=True, **pair)])
    isolated = write(tmp_path / "isolated.lmdb", [Atoms(pbc=False, **pair)])
    out = tmp_path / "out.lmdb"
    args = ("--per-seed", 2, "--rattle", 0.01, "--min-distance", 1.5, "--attempts", 3)
    code, text, errors = sample(periodic, out, *args)
    assert code == 1 and errors == [f"error: file {periodic}: no candidate passed the minimum-distance filter "
                                    "(1.5 Å) in 3 draws per candidate; lower --rattle/--strain or --min-distance"]
    assert not out.exists()
    code, text, _ = sample(isolated, out, *args)
    assert code == 0 and len(open_dataset(out)) == 2, text
    # some draws rejected: a seed that falls short is counted, not an error
    mixed = write(tmp_path / "mixed.lmdb", [Atoms(pbc=True, **pair), Atoms(pbc=False, **pair)])
    code, text, _ = sample(mixed, out, *args)
    assert code == 0 and "wrote 2 candidates from 2 seed structures" in text and "6 draws rejected" in text, text
    assert candidate_provenance(out)["counts"]["seeds_short"] == [0]


@pytest.mark.parametrize("args, message", [
    (("--rattle", 0), "--rattle and --strain are both 0: every candidate would be a copy of its seed"),
    (("--strain", -0.1), "--strain must be in [0, 0.5), got -0.1"),
    (("--per-seed", 0), "--per-seed must be at least 1, got 0"),
    (("--min-distance", "nan"), "--min-distance must be a finite number >= 0, got nan"),
], ids=["nothing-to-vary", "strain", "per-seed", "min-distance"])
def test_bad_settings_are_named(seeds, tmp_path, args, message):
    code, text, errors = sample(seeds, tmp_path / "x.lmdb", *args)
    assert code == 1 and errors == [f"error: {message}"], text


def test_bad_outputs_are_named(seeds, tmp_path):
    code, text, errors = sample(seeds, tmp_path / "x.xyz")
    assert code == 1 and errors == [f"error: file {tmp_path / 'x.xyz'}: --out must be a .lmdb file"], text
    before = seeds.read_bytes()
    code, text, errors = sample(seeds, seeds)
    assert code == 1 and errors == [f"error: file {seeds}: is a file of the seed set; write the candidates elsewhere"]
    assert seeds.read_bytes() == before
