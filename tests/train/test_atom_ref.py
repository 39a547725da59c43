"""Per-element reference energies fitted by the trainer (``atom_ref: fit``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache import keys as K
from kdcache.errors import ConfigError
from kdcache.train import TrainConfig, Trainer
from kdcache.train.data import collate
from kdcache.train.trainer import fit_atom_refs, label_statistics, label_statistics_with_refs

from . import kd_helpers as H


def test_fit_recovers_the_true_references():
    rng = np.random.default_rng(0)
    ref_true = {1: -3.4, 8: -5.1, 29: -4.0, 79: -3.2}
    comps = [rng.choice(list(ref_true), size=rng.integers(5, 40)) for _ in range(30)]
    energies = [sum(ref_true[int(z)] for z in c) for c in comps]
    ref = fit_atom_refs(energies, comps)
    assert ref.shape == (119,)
    for z, r in ref_true.items():
        assert ref[z] == pytest.approx(r, abs=1e-9)
    others = np.delete(ref, list(ref_true))
    assert np.all(others == 0.0)  # absent elements stay zero


def test_residual_statistics_on_demo_data(train_set):
    _, raw_std = label_statistics(train_set)
    mean, std, ref = label_statistics_with_refs(train_set)
    assert std < 0.5 * raw_std
    present = {int(z) for i in range(len(train_set)) for z in train_set[i][K.ATOMIC_NUMBERS].tolist()}
    assert set(np.flatnonzero(ref).tolist()) <= present


def _config(tmp_path, name, **kw):
    base = dict(student=H.STUDENT, student_overrides=H.STUDENT_OVERRIDES, out=str(tmp_path / name),
                batch_size=4, progress=False, lr=5e-3, seed=0, max_steps=4)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _val_energy_mae(student, val_set):
    batch = collate([val_set[i] for i in range(len(val_set))])
    student.eval()
    with torch.enable_grad():
        pred = student.predict(batch)[K.ENERGY].detach()
    return float((pred - batch[K.ENERGY].to(pred.dtype)).abs().mean())


def test_fit_beats_none_on_validation_energy(tmp_path, train_set, val_set):
    maes = {}
    for mode in ("fit", "none"):
        trainer = Trainer(_config(tmp_path, mode, atom_ref=mode), train_dataset=train_set)
        ref = trainer.student.normalizer.atom_ref
        assert bool((ref != 0).any()) == (mode == "fit")
        trainer.fit()
        maes[mode] = _val_energy_mae(trainer.student, val_set)
        assert (tmp_path / mode / "config.yaml").read_text().count(f"atom_ref: {mode}") == 1
    assert maes["fit"] < 0.5 * maes["none"], maes


def test_given_statistics_and_bad_setting(tmp_path, train_set):
    trainer = Trainer(_config(tmp_path, "given", energy_mean=-1.0, energy_std=2.0), train_dataset=train_set)
    assert not bool((trainer.student.normalizer.atom_ref != 0).any())  # given statistics: no fit
    with pytest.raises(ConfigError, match="atom_ref"):
        _config(tmp_path, "bad", atom_ref="maybe")
