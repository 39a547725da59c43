"""SchNet: parity with the reference implementation (fairchem-core 1.10 / PyG SchNet, float64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache import keys as K
from kdcache.models.checkpoint import load_checkpoint
from kdcache.models.schnet import SchNet

from .test_painn import reference_batch

REF = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "schnet"


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF / "reference.npz"))


@pytest.fixture(scope="module")
def loaded():
    return load_checkpoint(REF / "checkpoint.pt", dtype=torch.float64)


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.abs(a.detach().numpy() - b).max() / np.abs(b).max())


def test_parity_with_reference(ref, loaded):
    model = loaded.model
    assert isinstance(model, SchNet) and loaded.used_ema
    out = model(reference_batch(ref), features=(K.NODE,))
    assert out[K.NODE].shape == (47, 32)
    for key in (K.ENERGY, K.FORCES, K.ATOM_ENERGY, K.NODE):
        assert _rel(out[key], ref[key]) < 1e-8, key


def test_no_vector_features(ref, loaded):
    with pytest.raises(ValueError, match="vector"):
        loaded.model(reference_batch(ref), features=(K.VECTOR,))


def test_filter_network_is_shared_like_the_reference():
    """``mlp`` and ``conv.nn`` are one module: both keys in the state dict, one set of weights."""
    model = SchNet(hidden_channels=8, num_filters=6, num_interactions=2, num_gaussians=5, cutoff=4.0)
    sd = model.state_dict()
    assert "interactions.0.mlp.0.weight" in sd and "interactions.0.conv.nn.0.weight" in sd
    assert model.interactions[0].mlp is model.interactions[0].conv.nn
    # trainable tensors counted once (this is also the order of EMA shadow parameters)
    assert len(list(model.parameters())) == 1 + 2 * 9 + 4


def test_forces_are_minus_energy_gradient(ref, loaded):
    batch = reference_batch(ref)
    batch.pos = batch.pos.clone().requires_grad_(True)
    out = loaded.model(batch)
    (grad,) = torch.autograd.grad(out[K.ENERGY].sum(), batch.pos)
    torch.testing.assert_close(out[K.FORCES], -grad)


def test_mean_readout():
    torch.manual_seed(0)
    model = SchNet(hidden_channels=8, num_filters=6, num_interactions=1, num_gaussians=5, cutoff=4.0, readout="mean").double()
    from torch_geometric.data import Batch, Data

    pos = torch.rand(4, 3, dtype=torch.float64) * 3
    data = Batch.from_data_list([Data(pos=pos, atomic_numbers=torch.tensor([1, 6, 7, 8]), natoms=torch.tensor([4]),
                                      cell=torch.zeros(1, 3, 3, dtype=torch.float64), pbc=torch.zeros(1, 3, dtype=torch.bool))])
    out = model(data)
    torch.testing.assert_close(out[K.ENERGY], out[K.ATOM_ENERGY].mean().view(1))
