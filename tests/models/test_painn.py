"""PaiNN: parity with the reference implementation (fairchem-core 1.10, float64) and layer checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from kdcache import keys as K
from kdcache.models.checkpoint import load_checkpoint
from kdcache.models.painn import PaiNN

REF = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "painn"


def reference_batch(ref) -> Batch:
    """The reference structures as a kdcache batch (float64, exactly the reference inputs)."""
    items, start = [], 0
    for s, n in enumerate(ref["natoms"]):
        sl = slice(start, start + int(n))
        start += int(n)
        items.append(
            Data(
                pos=torch.tensor(ref["pos"][sl]),
                atomic_numbers=torch.tensor(ref["atomic_numbers"][sl]),
                cell=torch.tensor(ref["cell"][s]).view(1, 3, 3),
                pbc=torch.ones(1, 3, dtype=torch.bool),
                natoms=torch.tensor([int(n)]),
                tags=torch.tensor(ref["tags"][sl]),
                fixed=torch.tensor(ref["fixed"][sl]).bool(),
            )
        )
    return Batch.from_data_list(items)


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
    assert isinstance(model, PaiNN) and loaded.used_ema and loaded.source_format == "ocp"
    out = model(reference_batch(ref), features=(K.NODE, K.VECTOR))
    assert out[K.VECTOR].shape == (47, 3, 32) and out[K.NODE].shape == (47, 32)
    for key in (K.ENERGY, K.FORCES, K.ATOM_ENERGY, K.NODE, K.VECTOR):
        assert _rel(out[key], ref[key]) < 1e-8, key


def test_parity_needs_the_ema_weights(ref):
    """The reference outputs are those of the EMA weights: the raw trained weights differ."""
    ckpt = torch.load(REF / "checkpoint.pt", weights_only=True)
    model = PaiNN(**ckpt["config"]["model_attributes"]).double()
    model.load_state_dict({k[len("module."):]: v for k, v in ckpt["state_dict"].items()}, strict=False)
    out = model(reference_batch(ref))
    assert _rel(out[K.ENERGY], ref[K.ENERGY]) > 1e-6


def test_predict_is_in_physical_units(ref, loaded):
    model = loaded.model
    batch = reference_batch(ref)
    raw, phys = model(batch), model.predict(batch)
    mean, std = -0.7554450631141663, 2.887317180633545
    torch.testing.assert_close(phys[K.ENERGY], raw[K.ENERGY] * std + mean)
    torch.testing.assert_close(phys[K.FORCES], raw[K.FORCES] * std)
    # per-atom energies still sum to the energy
    per_struct = torch.zeros(3, dtype=torch.float64).index_add_(0, batch.batch, phys[K.ATOM_ENERGY])
    torch.testing.assert_close(per_struct, phys[K.ENERGY])


def test_features_only_on_request(ref, loaded):
    out = loaded.model(reference_batch(ref))
    assert set(out) == {K.ENERGY, K.FORCES, K.ATOM_ENERGY}
    with pytest.raises(ValueError, match="edge"):
        loaded.model(reference_batch(ref), features=(K.EDGE,))


def test_graph_is_symmetric_and_limited():
    """Every kept edge has its counter edge; before symmetrisation no atom has > max neighbours."""
    from kdcache.graph import batch_structures
    from kdcache.models.common import student_graph

    g = torch.Generator().manual_seed(0)
    cell = torch.tensor([[4.0, 0.0, 0.0], [1.0, 4.2, 0.0], [0.0, 0.3, 5.0]], dtype=torch.float64)
    pos = torch.rand(6, 3, generator=g, dtype=torch.float64) @ cell
    data = Batch.from_data_list([Data(pos=pos, atomic_numbers=torch.full((6,), 29), cell=cell[None],
                                      pbc=torch.ones(1, 3, dtype=torch.bool), natoms=torch.tensor([6]))])
    src, dst, dist, vec = student_graph(pos, batch_structures(data, pos), 6.0, 10, symmetric=False)
    assert torch.bincount(dst, minlength=6).max() == 10
    src, dst, dist, vec = student_graph(pos, batch_structures(data, pos), 6.0, 10, symmetric=True)
    assert src.numel() % 2 == 0
    pairs = sorted(zip(src.tolist(), dst.tolist(), dist.round(decimals=9).tolist()))
    counter = sorted(zip(dst.tolist(), src.tolist(), dist.round(decimals=9).tolist()))
    assert pairs == counter
    assert torch.all(dist <= 6.0) and torch.allclose(vec.norm(dim=-1), torch.ones_like(dist))


def test_gradient_forces_variant_runs_and_is_conservative():
    torch.manual_seed(0)
    # no neighbour limit in reach: a limit makes the energy jump where the ranking changes
    model = PaiNN(hidden_channels=16, num_layers=2, num_rbf=8, cutoff=5.0, max_neighbors=500,
                  direct_forces=False).double()
    assert not hasattr(model, "out_forces")
    cell = torch.eye(3, dtype=torch.float64) * 4.5
    pos = torch.rand(5, 3, dtype=torch.float64) * 4.5
    data = Batch.from_data_list([Data(pos=pos, atomic_numbers=torch.tensor([1, 6, 8, 29, 29]),
                                      cell=cell[None], pbc=torch.ones(1, 3, dtype=torch.bool),
                                      natoms=torch.tensor([5]))])
    with torch.no_grad():
        out = model(data)
    assert not out[K.FORCES].requires_grad and out[K.FORCES].shape == (5, 3)
    # a random displacement changes the energy by -F·dx to first order
    dx = torch.randn(5, 3, dtype=torch.float64) * 1e-6
    moved = data.clone()
    moved.pos = data.pos + dx
    with torch.no_grad():
        de = model(moved)[K.ENERGY] - out[K.ENERGY]
    torch.testing.assert_close(de, -(out[K.FORCES] * dx).sum().view(1), rtol=1e-4, atol=1e-12)


def test_unfitted_scale_factor_is_identity():
    from kdcache.models.scaling import ScaleFactor

    sf = ScaleFactor()
    x = torch.randn(4, 3)
    assert torch.equal(sf(x), x)
    sf.set_(2.0)
    assert torch.equal(sf(x), 2 * x) and not sf.scale_factor.requires_grad
