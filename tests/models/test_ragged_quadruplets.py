"""GemNet-OC's ragged quadruplet sum (the compiled path's on one generated-kernel thread,
:meth:`kdcache.models.gemnet_oc.model.GemNetOC.fast_graph`): the same body outputs as the padded
sum of the reference layout, to float64 round-off, on a slab and on a molecule, and it runs only
where it is faster."""

from __future__ import annotations

import pytest
import torch

from kdcache.models.fast import fast_model
from kdcache.models.gemnet_oc.indices import PAD_WIDTH, RAGGED
from kdcache.models.gemnet_oc.layers import BasisEmbedding, EfficientInteractionBilinear, RaggedBasis
from kdcache.models.presets import build_preset
from tests.models.test_fast import _batch, _molecule, _slab


def _ragged(graph: dict) -> dict:
    return {**graph, "quad_idx": {**graph["quad_idx"], RAGGED: True}}


@pytest.mark.parametrize("structures", ["slab", "slab+molecule"])
def test_ragged_sum_equals_padded_sum(structures):
    torch.manual_seed(0)
    model = build_preset("gemnet-oc-tiny", num_blocks=2).double().eval()
    atoms = [_slab()] if structures == "slab" else [_slab(), _molecule()]
    batch = _batch(*atoms)
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    inputs = model.prepare_inputs(batch, autograd_forces=False)
    graph = model.make_graph(inputs)
    quads, width = graph["quad_idx"]["out"].numel(), graph["quad_idx"][PAD_WIDTH]
    num_edges = graph["main_graph"]["edge_index"].shape[1]
    assert quads > 0 and width * num_edges > 1.5 * quads  # the padding the ragged sum saves is there
    features = model.available_features
    # what each quadruplet bilinear layer gets and gives: a ragged basis on the ragged graph only,
    # and an output that is not zero (or the comparison would not see the sum)
    seen = []
    hooks = [block.quad_interaction.mlp_sbf.register_forward_hook(
        lambda mod, args, out: seen.append((isinstance(args[0], RaggedBasis), float(out.abs().max()))))
        for block in model.int_blocks]
    with torch.no_grad():
        padded = model.body(inputs.pos, inputs.atomic_numbers, graph, features)
        ragged = model.body(inputs.pos, inputs.atomic_numbers, _ragged(graph), features)
    for hook in hooks:
        hook.remove()
    assert [r for r, _ in seen] == [False, False, True, True] and min(v for _, v in seen) > 1e-3
    assert set(ragged) == set(padded)
    for key, ref in padded.items():
        if ref.is_floating_point():
            scale = float(ref.abs().max())
            torch.testing.assert_close(ragged[key], ref, rtol=0, atol=1e-10 * max(scale, 1.0), msg=key)
        else:
            assert torch.equal(ragged[key], ref), key


def test_ragged_contraction_is_the_padded_one():
    """The bilinear layer alone, with random bases: ragged and padded give the same [E, out]."""
    torch.manual_seed(1)
    emb = BasisEmbedding(num_radial=4, emb_size_interm=3, num_spherical=5).double()
    bilinear = EfficientInteractionBilinear(emb_size_in=6, emb_size_interm=3, emb_size_out=7).double()
    num_edges, counts = 5, torch.tensor([3, 0, 7, 1, 4])
    outer = torch.repeat_interleave(torch.arange(num_edges), counts)
    inner = torch.cat([torch.arange(int(c)) for c in counts])
    rad_basis, sph_basis = torch.randn(num_edges, 4, dtype=torch.float64), torch.randn(len(outer), 5, dtype=torch.float64)
    m = torch.randn(len(outer), 6, dtype=torch.float64)
    kwargs = dict(rad_basis=rad_basis, sph_basis=sph_basis, idx_sph_outer=outer, idx_sph_inner=inner)
    padded = bilinear(emb(**kwargs), m, outer, inner)
    ragged = bilinear(emb(**kwargs, ragged=True), m, outer, inner)
    assert padded.shape == (num_edges, 7)
    torch.testing.assert_close(ragged, padded, rtol=1e-12, atol=1e-12)
    assert torch.equal(ragged[1], bilinear.bilinear(torch.zeros(1, 18, dtype=torch.float64))[0])  # no quadruplets
    with pytest.raises(ValueError, match="idx_rad_inner"):
        emb(**kwargs, ragged=True, idx_rad_outer=outer, idx_rad_inner=inner, num_atoms=num_edges)


def test_ragged_only_on_one_kernel_thread():
    """The ragged sum is a scatter-add, atomic on more generated-kernel threads (slower than the
    padded sum there): the compiled path marks it only for a one-thread view."""
    model = build_preset("gemnet-oc-tiny", num_blocks=1).eval()
    batch = _batch(_slab())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fast_model(model)
        torch.set_num_threads(2)
        two = fast_model(model)
    finally:
        torch.set_num_threads(before)
    assert one.fast_path.kernel_threads == 1 and two.fast_path.kernel_threads == 2
    inputs = model.prepare_inputs(batch, autograd_forces=False)
    graph = model.make_graph(inputs)
    assert one.fast_graph(inputs, graph)["quad_idx"][RAGGED] is True
    assert RAGGED not in two.fast_graph(inputs, graph)["quad_idx"]
    assert RAGGED not in model.fast_graph(inputs, graph)["quad_idx"]  # the eager model: the reference layout
    # the students' generated kernels stay on one thread whatever torch's count
    torch.set_num_threads(2)
    try:
        assert fast_model(build_preset("painn-tiny")).fast_path.kernel_threads == 1
    finally:
        torch.set_num_threads(before)
