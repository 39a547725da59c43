"""Molecules and small systems: every model on empty edge, triplet and quadruplet sets.

A COLL molecule has no cell and tag 0 on every atom, so GemNet-OC (OC20 quadruplet tags [1, 2])
sees no quadruplet at all; a lone atom, or two atoms farther apart than the cutoff, have no edge
and no triplet. Such structures must run alone, in a batch of their own, and batched with
periodic slabs: finite outputs, exactly zero forces and edge sums on edgeless atoms, whose energy
is then a constant of their element, and nothing else in the batch changed by their presence.
"""

from __future__ import annotations

import pytest
import torch

from kdcache import keys as K
from kdcache.models.gemnet_oc.indices import get_mixed_triplets, get_quadruplets, get_triplets
from kdcache.models.gemnet_oc.layers import BasisEmbedding
from kdcache.models.presets import build_preset, preset_config

from .test_physics import MODELS, PRESET, _batch, _close, _far_pair, _model, _molecule, _random_structure, _run

#: per-atom features that are sums over an atom's edges (PaiNN's vectors start at zero and only
#: messages change them): exactly zero on an atom without edges
EDGE_SUMS = (K.E2N, K.E2V, K.VECTOR)


def _force_modes(name: str) -> list:
    """Direct and gradient forces where the architecture has both (SchNet: gradient only)."""
    return [{}] if name == "schnet" else [{}, {"direct_forces": False}]


def _slab():
    """A periodic slab (pbc T T F) with adsorbate tags: it has edges, triplets, quadruplets."""
    slab = _random_structure(3, n=8)
    slab.pbc = torch.tensor([[True, True, False]])
    return slab


def _mixed_structures() -> tuple[list, list[int]]:
    """A slab, a lone C, a C–O pair out of cutoff, a COLL molecule, a lone O; and which of the
    batch's atoms have no edge."""
    items = [
        _slab(),
        _molecule([6], [[0.0, 0.0, 0.0]]),
        _far_pair(),
        _random_structure(2, n=6, periodic=False, tag=0),
        _molecule([8], [[1.0, -2.0, 3.0]]),
    ]
    isolated = [8, 9, 10, 17]
    return items, isolated


@pytest.mark.parametrize("name", MODELS)
def test_edgeless_atoms_zero_force_element_energy_and_nothing_else_changes(name):
    items, isolated = _mixed_structures()
    for overrides in _force_modes(name):
        model = _model(name, **overrides)
        out = _run(model, _batch(*items))
        for key, value in out.items():
            if value.is_floating_point():
                assert bool(torch.isfinite(value).all()), key
        # exactly zero, not merely small: no edge, so nothing can act on these atoms
        assert torch.equal(out[K.FORCES][isolated], torch.zeros(len(isolated), 3, dtype=torch.float64))
        for key in EDGE_SUMS:
            if key in out:
                assert not bool(out[key][isolated].any()), key
        # the energy of an edgeless atom depends on its element only: the lone C and the C of the
        # far pair agree, as do both O atoms, and the pair's energy is the sum of the two
        e, atom_e = out[K.ENERGY], out[K.ATOM_ENERGY]
        _close(atom_e[9:11], atom_e[[8, 17]], "atom_energy of edgeless atoms")
        _close(e[2:3], atom_e[8:9] + atom_e[17:18], "energy of the far pair")
        _close(e[[1, 4]], atom_e[[8, 17]], "energy of a lone atom")
        # the slab and the molecule come out as they do alone
        for index, start in ((0, 0), (3, 11)):
            alone = _run(model, _batch(items[index]))
            n = int(items[index].natoms)
            _close(e[index : index + 1], alone[K.ENERGY], "energy")
            for key in (K.FORCES, K.ATOM_ENERGY, *(k for k in alone if k in model.available_features)):
                _close(out[key][start : start + n], alone[key], key)
            assert float(alone[K.FORCES].detach().abs().max()) > 1e-6  # not vacuous: these atoms do interact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MODELS)
def test_training_step_on_a_batch_without_any_edge(name, dtype):
    """Forward and backward in training mode when the whole batch has no edge (float32 too)."""
    batch = _batch(_molecule([6], [[0.0, 0.0, 0.0]]), _far_pair())
    batch.pos, batch.cell = batch.pos.to(dtype), batch.cell.to(dtype)
    for overrides in _force_modes(name):
        torch.manual_seed(0)
        model = build_preset(PRESET[name], **overrides).to(dtype).train()
        out = model(batch, features=tuple(f for f in model.available_features if f != K.EDGE))
        assert out[K.ENERGY].shape == (2,) and out[K.FORCES].shape == (3, 3)
        assert not bool(out[K.FORCES].any())
        loss = (out[K.ENERGY] - 1.0).square().sum() + out[K.FORCES].square().sum()
        loss = loss + sum(out[k].square().sum() for k in model.available_features if k in out and k != K.EDGE)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
        assert any(bool(g.any()) for g in grads)  # the element embeddings still learn


def test_gemnet_oc_index_sets_can_be_empty():
    """Triplets and quadruplets of graphs without edges are empty index tensors (long)."""
    none = {K.EDGE_INDEX: torch.zeros(2, 0, dtype=torch.long), K.CELL_OFFSET: torch.zeros(0, 3, dtype=torch.long)}
    pair = {  # one symmetric edge pair 0 <-> 1: edges, but no triplet and no quadruplet
        K.EDGE_INDEX: torch.tensor([[1, 0], [0, 1]]),
        K.CELL_OFFSET: torch.zeros(2, 3, dtype=torch.long),
    }
    for main in (none, pair):
        trip = get_triplets(main, num_atoms=3)
        assert all(v.shape == (0,) and v.dtype == torch.long for v in trip.values())
        mixed = get_mixed_triplets(none, main, num_atoms=3, return_agg_idx=True)
        assert all(v.shape == (0,) for v in mixed.values())
        quad = get_quadruplets(main, none, num_atoms=3)
        for key in ("out", "trip_in_to_quad", "trip_out_to_quad", "out_agg"):
            assert quad[key].shape == (0,) and quad[key].dtype == torch.long, key
    # a basis of no edge projects to no row, with the widths the bilinear layers expect
    layer = BasisEmbedding(num_radial=6, emb_size_interm=4, num_spherical=9)
    rad, sph = layer(torch.zeros(0, 6), torch.zeros(0, 9), idx_sph_outer=torch.zeros(0, dtype=torch.long),
                     idx_sph_inner=torch.zeros(0, dtype=torch.long))
    assert rad.shape == (0, 4, 9) and sph.shape == (0, 9, 0)


def test_coll_preset_puts_quadruplets_on_untagged_molecules():
    """With OC20's quadruplet tags a COLL molecule (tags 0) has none; the COLL preset's have."""
    molecule = _batch(_random_structure(2, n=6, periodic=False, tag=0))
    counts = {}
    for label, tags in (("oc20", preset_config("gemnet-oc")[1]["qint_tags"]),
                        ("coll", preset_config("gemnet-oc-coll")[1]["qint_tags"])):
        model = build_preset("gemnet-oc-tiny", qint_tags=tags).double()
        counts[label] = model.build_graphs(molecule.pos, molecule)["quad_idx"]["out"].numel()
    assert counts["oc20"] == 0 and counts["coll"] > 0
