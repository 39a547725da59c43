"""Per-element reference energies in the normaliser: predict(), per-atom sums, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch, Data

from kdcache import keys as K
from kdcache.models.base import NUM_ELEMENTS, Normalizer, PotentialModel
from kdcache.models.checkpoint import load_checkpoint, save_checkpoint
from kdcache.models.presets import build_preset


class _Fixed(PotentialModel):
    """Raw outputs fixed in advance: isolates the normaliser."""

    name = "stub"

    def __init__(self, raw_atom):
        super().__init__()
        self.raw_atom = raw_atom

    def forward(self, batch, features=()):
        n = int(batch[K.NATOMS].shape[0])
        e = torch.zeros(n, dtype=torch.float64).index_add_(0, batch[K.BATCH], self.raw_atom)
        return {K.ENERGY: e, K.FORCES: torch.zeros(self.raw_atom.shape[0], 3, dtype=torch.float64),
                K.ATOM_ENERGY: self.raw_atom}


def _batch():
    a = Data(atomic_numbers=torch.tensor([29, 29, 79]), natoms=torch.tensor([3]), pos=torch.zeros(3, 3))
    b = Data(atomic_numbers=torch.tensor([79, 8]), natoms=torch.tensor([2]), pos=torch.zeros(2, 3))
    return Batch.from_data_list([a, b])


def test_predict_adds_the_reference_sum_and_atom_energies_sum_to_it():
    raw_atom = torch.tensor([0.1, -0.2, 0.3, 0.5, -0.4], dtype=torch.float64)
    model = _Fixed(raw_atom)
    ref = torch.zeros(NUM_ELEMENTS, dtype=torch.float64)
    ref[29], ref[79], ref[8] = -3.5, -2.25, -7.0
    model.normalizer = Normalizer(energy_mean=1.5, energy_std=2.0, atom_ref=ref)
    out = model.predict(_batch())
    raw_e = torch.tensor([0.2, 0.1], dtype=torch.float64)
    expected = raw_e * 2.0 + 1.5 + torch.tensor([-3.5 * 2 - 2.25, -2.25 - 7.0], dtype=torch.float64)
    assert torch.allclose(out[K.ENERGY], expected, atol=1e-12)
    sums = torch.zeros(2, dtype=torch.float64).index_add_(0, _batch()[K.BATCH], out[K.ATOM_ENERGY])
    assert torch.allclose(sums, expected, atol=1e-12)
    # per-atom: std·raw + mean/natoms + ref[Z]
    assert out[K.ATOM_ENERGY][2].item() == pytest.approx(0.3 * 2.0 + 1.5 / 3 - 2.25)
    # norm_energy inverts denorm_energy with the same reference sum
    _, ref_sum = model.normalizer.batch_reference(_batch())
    assert torch.allclose(model.normalizer.norm_energy(expected, ref_sum), raw_e, atol=1e-12)


def test_zero_reference_is_the_plain_normalisation():
    raw_atom = torch.tensor([0.1, -0.2, 0.3, 0.5, -0.4], dtype=torch.float64)
    model = _Fixed(raw_atom)
    model.normalizer = Normalizer(energy_mean=1.5, energy_std=2.0)
    out = model.predict(_batch())
    assert torch.equal(out[K.ENERGY], torch.tensor([0.2, 0.1], dtype=torch.float64) * 2.0 + 1.5)


def test_checkpoint_round_trip_keeps_atom_ref_and_old_files_load_with_zeros(tmp_path):
    model = build_preset("painn-tiny")
    model.normalizer = Normalizer(-1.0, 2.0, atom_ref=torch.arange(NUM_ELEMENTS, dtype=torch.float64) * 0.5)
    save_checkpoint(tmp_path / "new.pt", model)
    loaded = load_checkpoint(tmp_path / "new.pt")
    assert torch.equal(loaded.model.normalizer.atom_ref, model.normalizer.atom_ref)
    assert float(loaded.model.normalizer.energy_std) == 2.0
    # a checkpoint written before references existed: no 'normalizer.atom_ref' key
    ckpt = torch.load(tmp_path / "new.pt", weights_only=True)
    del ckpt["state_dict"]["normalizer.atom_ref"]
    torch.save(ckpt, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert torch.equal(old.model.normalizer.atom_ref, torch.zeros(NUM_ELEMENTS, dtype=torch.float64))
    assert float(old.model.normalizer.energy_mean) == -1.0


def test_ocp_checkpoint_has_no_reference():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "painn" / "checkpoint.pt"
    loaded = load_checkpoint(path)
    assert loaded.source_format == "ocp"
    assert torch.equal(loaded.model.normalizer.atom_ref, torch.zeros(NUM_ELEMENTS, dtype=torch.float64))
