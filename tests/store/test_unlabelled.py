"""Stage one needs no labels: `kdcache extract` over data where some or all structures lack energy
and forces, then `kdcache store verify`; training on such data names the unlabelled sample."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K
from kdcache.store import FeatureStore

from .conftest import LAYOUT


def molecules(n: int, labelled, seed: int = 0) -> list:
    """``n`` small ASE molecules; those with ``labelled(i)`` carry energy and forces."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        k = int(rng.integers(3, 6))
        atoms = Atoms(numbers=rng.choice([1, 6, 8], size=k), positions=rng.uniform(0, 3.0, size=(k, 3)),
                      cell=np.eye(3) * 10.0, pbc=False)
        if labelled(i):
            atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(k, 3)))
        frames.append(atoms)
    return frames


def write_lmdb_of(path, frames):
    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    recs = []
    for a in frames:
        res = a.calc.results if a.calc is not None else {}
        recs.append(atoms_to_record(a, energy=res.get("energy"), forces=res.get("forces")))
    write_lmdb(path, recs)
    return path


def kdcache(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output, [line for line in res.output.splitlines() if line.startswith("error:")]


def extract(data, out):
    # batches of 4 mix labelled and unlabelled samples
    return kdcache("extract", "--teacher", "painn-tiny", "--data", data, "--out", out, "--batch-size", 4,
                   "--shard-atoms", LAYOUT["shard_atoms"], "--chunk-atoms", LAYOUT["chunk_atoms"], "--no-progress")


def odd(i):
    return i % 2 == 0


def never(i):
    return False


@pytest.mark.parametrize("kind", ["lmdb", "extxyz"])
@pytest.mark.parametrize("labelled", [odd, never], ids=["some-unlabelled", "all-unlabelled"])
def test_extract_and_verify_without_labels(tmp_path, kind, labelled):
    import ase.io

    frames = molecules(7, labelled)
    if kind == "lmdb":
        data = write_lmdb_of(tmp_path / "mol.lmdb", frames)
    else:
        data = tmp_path / "mol.extxyz"
        ase.io.write(data, frames, format="extxyz")
    out = tmp_path / "teacher.zarr"
    code, text, _ = extract(data, out)
    assert code == 0, text
    code, text, _ = kdcache("store", "verify", out, "--data", data)
    assert code == 0 and text.strip().endswith("OK"), text
    store = FeatureStore.open(out)
    got = store.read(list(range(7)))
    assert got[K.NATOMS].tolist() == [len(a) for a in frames]
    assert np.isfinite(got[K.FORCES].numpy()).all() and np.isfinite(got[K.ENERGY].numpy()).all()


@pytest.fixture(scope="module")
def folder_with_one_unlabelled(tmp_path_factory):
    """Two LMDB files of 4 molecules; global sample 6 (key 2 of the second file) has no labels,
    plus the store extracted from them."""
    folder = tmp_path_factory.mktemp("two") / "data"
    folder.mkdir()
    frames = molecules(8, lambda i: i != 6, seed=3)
    write_lmdb_of(folder / "a.lmdb", frames[:4])
    write_lmdb_of(folder / "b.lmdb", frames[4:])
    store = folder.parent / "teacher.zarr"
    code, text, _ = extract(folder, store)
    assert code == 0, text
    return folder, store


@pytest.mark.parametrize("normalize, workers", [(True, 0), (False, 0), (False, 1)],
                         ids=["label-statistics", "batches", "batches-in-a-worker"])
def test_training_names_the_unlabelled_sample(tmp_path, folder_with_one_unlabelled, normalize, workers):
    folder, store = folder_with_one_unlabelled
    config = tmp_path / "run.yaml"
    # without normalisation no label statistics are computed: the batch that holds sample 6 refuses
    # it, also when a loader worker loads it
    config.write_text(yaml.safe_dump({"normalize_labels": normalize, "num_workers": workers}))
    code, text, errors = kdcache("train", "-c", config, "--student", "painn-tiny", "--data", folder, "--store", store,
                                 "--strategy", "n2n", "--out", tmp_path / "run", "--max-steps", 4,
                                 "--batch-size", 4, "--no-progress")
    assert code == 1 and len(errors) == 1, text
    assert errors[0] == (f"error: file {folder / 'b.lmdb'}, sample 6, field 'energy': missing: training and "
                         "evaluation need 'energy' and 'forces' on every sample"), errors[0]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_eval_names_the_unlabelled_sample(tmp_path, folder_with_one_unlabelled):
    from kdcache.models.checkpoint import save_checkpoint
    from kdcache.models.presets import build_preset

    folder, _ = folder_with_one_unlabelled
    save_checkpoint(tmp_path / "model.pt", build_preset("painn-tiny"))
    code, text, errors = kdcache("eval", tmp_path / "model.pt", "--data", folder, "--batch-size", 3)
    assert code == 1 and errors == [f"error: file {folder / 'b.lmdb'}, sample 6, field 'energy': missing: training "
                                    "and evaluation need 'energy' and 'forces' on every sample"], text
