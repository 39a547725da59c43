"""`kdcache train --labels teacher|both`: distil on structures without labels. The teacher (here
ASE's EMT through `kdcache extract --teacher ase:...`) labels them once; training then reads the
store's energies and forces, never the dataset's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache import keys as K

from . import kd_helpers as H

EMT = "ase:ase.calculators.emt:EMT"


def kdcache(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output, [line for line in res.output.splitlines() if line.startswith("error:")]


def molecules(n: int, seed: int = 0) -> list:
    """``n`` H/C/N/O molecules of 3-6 atoms, no two atoms closer than 0.9 Å, in a 10 Å box."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n:
        k = int(rng.integers(3, 7))
        pos = rng.uniform(0, 3.0, size=(k, 3))
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)[np.triu_indices(k, 1)]
        if d.min() > 0.9:
            frames.append(Atoms(numbers=rng.choice([1, 6, 7, 8], size=k), positions=pos, cell=np.eye(3) * 10.0))
    return frames


def write(path, frames, labels=None):
    """An LMDB of ``frames``; ``labels(i)`` gives sample i's (energy, forces), or None: unlabelled."""
    from kdcache.data.lmdb_writer import atoms_to_record, write_lmdb

    recs = []
    for i, a in enumerate(frames):
        e, f = labels(i) if labels is not None else (None, None)
        recs.append(atoms_to_record(a, energy=e, forces=f))
    write_lmdb(path, recs)
    return path


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """8 unlabelled molecules and their EMT store (energies, forces, per-atom energies)."""
    folder = tmp_path_factory.mktemp("unlabelled")
    frames = molecules(8)
    data = write(folder / "mol.lmdb", frames)
    store = folder / "emt.zarr"
    code, text, _ = kdcache("extract", "--teacher", EMT, "--data", data, "--out", store, "--no-progress")
    assert code == 0, text
    return frames, data, store


def config(tmp_path, **settings):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"student_overrides": H.STUDENT_OVERRIDES, "ema_decay": 0.0, **settings}))
    return path


def train_args(cfg, data, store, out, labels):
    return ["train", "-c", cfg, "--student", H.STUDENT, "--data", data, "--store", store, "--labels", labels,
            "--out", out, "--max-steps", 2, "--batch-size", 4, "--no-progress"]


def test_unlabelled_data_trains_on_teacher_labels_only(tmp_path, unlabelled):
    from kdcache.data import open_dataset
    from kdcache.models.checkpoint import load_checkpoint
    from kdcache.store import FeatureStore
    from kdcache.train.trainer import label_statistics_with_refs

    frames, data, store = unlabelled
    ds = open_dataset(data)
    assert all(K.ENERGY not in ds[i] and K.FORCES not in ds[i] for i in range(len(ds)))
    cfg = config(tmp_path)
    # the dataset's own labels: there are none, and the error names the first sample
    code, text, errors = kdcache(*train_args(cfg, data, store, tmp_path / "ref", "reference"))
    assert code == 1 and errors == [f"error: file {data}, sample 0, field 'energy': missing: training and "
                                    "evaluation need 'energy' and 'forces' on every sample"], text
    # the teacher's: trains
    out = tmp_path / "teacher"
    code, text, _ = kdcache(*train_args(cfg, data, store, out, "teacher"))
    assert code == 0, text
    assert yaml.safe_load((out / "config.yaml").read_text())["labels"] == "teacher"
    # the normaliser (per-element references, mean, std) was fitted on EMT's energies
    from ase.calculators.emt import EMT as Emt

    calc = Emt()
    emt = []
    for a in frames:
        a = a.copy()
        a.positions = a.positions.astype(np.float32)  # as the LMDB keeps them
        a.calc = calc
        emt.append(np.float32(a.get_potential_energy()))  # as training reads them
    norm = load_checkpoint(out / "last.pt").model.normalizer
    fitted = label_statistics_with_refs(ds, store=FeatureStore.open(store), labels="teacher")
    from kdcache.train.trainer import fit_atom_refs

    np.testing.assert_allclose(fit_atom_refs(emt, [a.numbers for a in frames]), fitted[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(norm.atom_ref.numpy(), fitted[2], rtol=1e-6, atol=1e-6)
    assert float(norm.energy_std) == pytest.approx(fitted[1]) and fitted[1] != 1.0
    # evaluation needs labels: a named error on the unlabelled set
    code, text, errors = kdcache("eval", out / "last.pt", "--data", data)
    assert code == 1 and errors == [f"error: file {data}, sample 0, field 'energy': missing: training and "
                                    "evaluation need 'energy' and 'forces' on every sample"], text


def test_teacher_labels_ignore_the_datasets_own(tmp_path, unlabelled):
    """With --labels teacher, garbage reference labels change nothing: the same weights, bit for
    bit, as on the same structures without labels."""
    from kdcache.data import open_dataset
    from kdcache.store import FeatureStore
    from kdcache.train.config import TrainConfig
    from kdcache.train.trainer import Trainer

    frames, data, store_path = unlabelled
    rng = np.random.default_rng(5)
    garbage = write(tmp_path / "garbage.lmdb", frames,
                    lambda i: (float(rng.normal(1e4, 1e3)), rng.normal(0, 1e3, size=(len(frames[i]), 3))))
    weights = []
    for path in (data, garbage):
        ds = open_dataset(path)
        cfg = TrainConfig.from_dict({"student": H.STUDENT, "student_overrides": H.STUDENT_OVERRIDES, "labels": "teacher",
                                     "out": str(tmp_path / f"run-{path.stem}"), "max_steps": 3, "batch_size": 4,
                                     "progress": False, "ema_decay": 0.0, "strategy": "none"})
        trainer = Trainer(cfg, train_dataset=ds, store=FeatureStore.open(store_path))
        start = {k: v.clone() for k, v in trainer.student.state_dict().items()}
        assert trainer.fit()["step"] == 3
        weights.append({k: v.clone() for k, v in trainer.student.state_dict().items()})
        assert any(not torch.equal(start[k], weights[-1][k]) for k in start)  # it did learn something
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_both_takes_each_samples_own_labels_where_it_has_them(tmp_path, unlabelled):
    from kdcache.data import open_dataset
    from kdcache.store import FeatureStore
    from kdcache.train.data import JoinedDataset, target_key
    from kdcache.train.trainer import label_statistics

    frames, _, store_path = unlabelled
    rng = np.random.default_rng(7)
    own = {i: (float(rng.normal(-5, 1)), rng.normal(size=(len(frames[i]), 3))) for i in (1, 4)}
    ds = open_dataset(write(tmp_path / "some.lmdb", frames, lambda i: own.get(i, (None, None))))
    store = FeatureStore.open(store_path)
    teacher = store.read(list(range(len(ds))))
    split = torch.split(teacher[K.FORCES], teacher[K.NATOMS].tolist())
    both = JoinedDataset(ds, store, labels="both").__getitems__(list(range(len(ds))))
    only = JoinedDataset(ds, store, labels="teacher").__getitems__(list(range(len(ds))))
    for i in range(len(ds)):
        e, f = (torch.tensor([own[i][0]]).float(), torch.from_numpy(own[i][1]).float()) if i in own else (
            teacher[K.ENERGY][i : i + 1], split[i])
        assert torch.equal(both[i][K.ENERGY], e) and torch.equal(both[i][K.FORCES], f), i
        assert torch.equal(only[i][K.ENERGY], teacher[K.ENERGY][i : i + 1]) and torch.equal(only[i][K.FORCES], split[i])
    # the normaliser's statistics see the same mix
    mixed = np.array([own[i][0] if i in own else float(teacher[K.ENERGY][i]) for i in range(len(ds))])
    mean, std = label_statistics(ds, store=store, labels="both")
    assert mean == pytest.approx(np.float32(mixed).astype(np.float64).mean(), rel=1e-6)
    # a rotation turns the teacher's forces as labels like the stored target beside them
    rotated = JoinedDataset(ds, store, augment=["rotate"], labels="teacher").__getitems__([0])[0]
    torch.testing.assert_close(rotated[K.FORCES], rotated[target_key(K.FORCES)])
    assert not torch.allclose(rotated[K.FORCES], split[0])
    torch.testing.assert_close(rotated[K.FORCES].norm(dim=1), split[0].norm(dim=1))


def test_settings_refused_with_a_name(tmp_path, unlabelled):
    _, data, store = unlabelled
    cfg = config(tmp_path)
    base = ["train", "-c", cfg, "--student", H.STUDENT, "--data", data, "--out", tmp_path / "r", "--max-steps", 1]
    code, text, errors = kdcache(*base, "--labels", "teacher")
    assert code == 1 and errors == ["error: --labels teacher needs a feature store (--store)"], text
    code, text, errors = kdcache(*base, "--labels", "teachers", "--store", store)
    assert code == 1 and errors == ["error: option --labels: 'teachers' is not one of ['reference', 'teacher', 'both']"]
    # a store without the teacher's energy and forces
    per_atom = tmp_path / "atom_energy.zarr"
    code, text, _ = kdcache("extract", "--teacher", EMT, "--features", "atom_energy", "--data", data, "--out", per_atom,
                            "--no-progress")
    assert code == 0, text
    code, text, errors = kdcache(*base, "--labels", "both", "--store", per_atom)
    assert code == 1 and errors == [f"error: --labels both trains on the teacher's energy and forces, but store "
                                    f"{per_atom} holds ['atom_energy']; extract with --features ...,outputs"], text


def test_sample_label_distil_end_to_end(tmp_path):
    """Seed structures -> candidates (`data sample`) -> labelled once by EMT (`extract`) ->
    a student trained on those labels alone (`train --labels teacher`), all through `kdcache`."""
    seeds = write(tmp_path / "seeds.lmdb", molecules(2, seed=3), lambda i: (-1.0, np.zeros((3 + i, 3))))
    cand, store = tmp_path / "cand.lmdb", tmp_path / "cand.zarr"
    code, text, _ = kdcache("data", "sample", seeds, "--out", cand, "--per-seed", 4, "--rattle", 0.05, "--strain", 0.02)
    assert code == 0 and "wrote 8 candidates" in text, text
    code, text, _ = kdcache("extract", "--teacher", EMT, "--data", cand, "--out", store, "--no-progress")
    assert code == 0, text
    code, text, _ = kdcache("store", "verify", store, "--data", cand)
    assert code == 0 and text.strip().endswith("OK"), text
    out = tmp_path / "run"
    code, text, _ = kdcache("train", "-c", config(tmp_path), "--student", H.STUDENT, "--data", cand, "--store", store,
                            "--labels", "teacher", "--strategy", "vanilla2", "--out", out, "--max-steps", 2,
                            "--batch-size", 4, "--no-progress")
    assert code == 0 and (out / "last.pt").exists(), text
    import csv

    row = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    assert all(np.isfinite(float(row[k])) for k in ("train_energy", "train_forces", "train_vanilla2")), row
