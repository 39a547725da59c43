"""COLL extended XYZ (both energy choices), ASE db / traj sources, and `kdcache data convert`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from torch_geometric.loader import DataLoader
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K
from kdcache.data import AseDataset, CollDataset, open_dataset
from kdcache.errors import DataError


@pytest.mark.parametrize("energy_key,expected", [(None, [-2079.8601, -4133.5]), ("energy", [-2079.8601, -4133.5]),
                                                 ("atomization_energy", [-9.3101, -4.2])])
def test_coll_energy_choice(coll_file, energy_key, expected):
    ds = open_dataset(coll_file, energy_key=energy_key)
    assert len(ds) == 2
    assert [ds[i][K.ENERGY].item() for i in range(2)] == pytest.approx(expected, abs=1e-3)
    s = ds[0]
    assert s[K.ATOMIC_NUMBERS].tolist() == [8, 1, 1]
    assert torch.allclose(s[K.POSITIONS][1], torch.tensor([0.0, 0.763239, -0.477047]))
    assert torch.allclose(s[K.FORCES][0], torch.tensor([0.1, 0.2, 0.3]))
    # non-periodic molecule: zero cell, no periodic direction
    assert torch.equal(s[K.CELL], torch.zeros(1, 3, 3)) and s[K.PBC].tolist() == [[False] * 3]
    assert s[K.TAGS].tolist() == [0, 0, 0] and not s[K.FIXED].any()
    assert ds[1][K.SAMPLE_INDEX].tolist() == [1]
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch[K.CELL].shape == (2, 3, 3) and batch[K.PBC].shape == (2, 3) and batch.num_nodes == 5


def test_coll_dataset_class(coll_file):
    assert CollDataset(coll_file, "atomization_energy")[1][K.ENERGY].item() == pytest.approx(-4.2)
    with pytest.raises(DataError) as err:
        CollDataset(coll_file, "free_energy")
    assert err.value.field == "energy_key"
    with pytest.raises(DataError) as err:
        open_dataset(coll_file, energy_key="nope")
    assert (err.value.index, err.value.field) == (0, "nope")


def _frames():
    frames = []
    for i in range(3):
        a = Atoms("Cu4O", positions=np.random.default_rng(i).uniform(0, 5, (5, 3)),
                  cell=np.diag([6.0, 6.0, 12.0]) + np.array([[0, 0, 0], [1.0, 0, 0], [0, 0, 0]]), pbc=True)
        a.set_tags([0, 0, 1, 1, 2])
        a.set_constraint(FixAtoms(indices=[0, 1]))
        a.info.update(sid=500 + i, fid=i)
        a.calc = SinglePointCalculator(a, energy=-3.0 - i, forces=np.full((5, 3), 0.1 * (i + 1)))
        frames.append(a)
    return frames


@pytest.mark.parametrize("suffix", [".extxyz", ".traj", ".db"])
def test_ase_formats_keep_sid_fid_tags_fixed(tmp_path, suffix):
    import ase.io

    frames = _frames()
    path = tmp_path / f"frames{suffix}"
    if suffix == ".db":
        import ase.db

        with ase.db.connect(str(path)) as db:
            for a in frames:
                db.write(a, sid=a.info["sid"], fid=a.info["fid"])
    else:
        ase.io.write(str(path), frames)
    ds = open_dataset(path)
    assert isinstance(ds, AseDataset) and len(ds) == 3
    for i, a in enumerate(frames):
        s = ds[i]
        assert torch.allclose(s[K.POSITIONS].double(), torch.tensor(a.positions), atol=1e-6)
        assert torch.allclose(s[K.CELL][0].double(), torch.tensor(np.asarray(a.cell)), atol=1e-6)
        assert s[K.PBC].tolist() == [[True] * 3]
        assert s[K.TAGS].tolist() == [0, 0, 1, 1, 2]
        assert s[K.FIXED].tolist() == [True, True, False, False, False]
        assert s[K.ENERGY].item() == pytest.approx(-3.0 - i)
        assert torch.allclose(s[K.FORCES], torch.full((5, 3), 0.1 * (i + 1)))
        if suffix != ".traj":  # trajectories do not keep atoms.info
            assert (s[K.SID].item(), s[K.FID].item()) == (500 + i, i)


def test_convert_cli_round_trip(tmp_path, coll_file):
    dst = tmp_path / "out" / "coll.lmdb"
    result = CliRunner().invoke(app, ["data", "convert", str(coll_file), str(dst), "--energy-key", "atomization_energy"])
    assert result.exit_code == 0, result.output
    src, out = open_dataset(coll_file, energy_key="atomization_energy"), open_dataset(dst)
    assert len(out) == 2
    for i in range(2):
        a, b = src[i], out[i]
        for key in (K.POSITIONS, K.ATOMIC_NUMBERS, K.CELL, K.PBC, K.NATOMS, K.TAGS, K.FIXED, K.ENERGY, K.FORCES):
            assert torch.equal(a[key], b[key]), key
    assert out[0][K.PBC].tolist() == [[False] * 3]  # non-periodic survives the LMDB


def test_convert_keeps_oc20_fields(tmp_path):
    import ase.io

    frames = _frames()
    ase.io.write(str(tmp_path / "f.extxyz"), frames)
    dst = tmp_path / "f.lmdb"
    result = CliRunner().invoke(app, ["data", "convert", str(tmp_path / "f.extxyz"), str(dst)])
    assert result.exit_code == 0, result.output
    s = open_dataset(dst)[2]
    assert (s[K.SID].item(), s[K.FID].item()) == (502, 2)
    assert s[K.TAGS].tolist() == [0, 0, 1, 1, 2] and s[K.FIXED].tolist() == [True, True, False, False, False]


def test_convert_bad_source_exits_1(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\nProperties=species:S:1:pos:R:3 energy=1.0\nXx 0 0 0\nH 0 0 nan\n")
    result = CliRunner().invoke(app, ["data", "convert", str(bad), str(tmp_path / "o.lmdb")])
    assert result.exit_code == 1
    assert "error: file" in result.output
    assert not (tmp_path / "o.lmdb").exists()
