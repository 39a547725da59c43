"""GemNet-OC's quadruplet sums of the compiled path (:meth:`kdcache.models.gemnet_oc.model.GemNetOC.fast_graph`):
ragged on one generated-kernel thread, bucketed on more. Each gives the same body outputs as the
padded sum of the reference layout, to float64 round-off, on a slab and on a molecule, and each
runs only where it is the faster one."""

from __future__ import annotations

import pytest
import torch

from kdcache.models.fast import fast_model
from kdcache.models.gemnet_oc.indices import BUCKETS, PAD_WIDTH, RAGGED, edge_buckets
from kdcache.models.gemnet_oc.layers import BasisEmbedding, BucketedBasis, EfficientInteractionBilinear, RaggedBasis
from kdcache.models.presets import build_preset
from tests.models.test_fast import _batch, _molecule, _slab


def _ragged(graph: dict) -> dict:
    return {**graph, "quad_idx": {**graph["quad_idx"], RAGGED: True}}


def _bucketed(graph: dict) -> dict:
    q = graph["quad_idx"]
    buckets = edge_buckets(q["out"], q["out_agg"], graph["main_graph"]["edge_index"].shape[1])
    assert len(buckets["edges"]) == 4  # enough edges for every bucket
    return {**graph, "quad_idx": {**q, BUCKETS: buckets}}


LAYOUTS = {"ragged": (_ragged, RaggedBasis), "bucketed": (_bucketed, BucketedBasis)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("structures", ["slab", "slab+molecule"])
def test_sum_equals_padded_sum(structures, layout):
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
    # what each quadruplet bilinear layer gets and gives: the layout's basis on its graph only,
    # and an output that is not zero (or the comparison would not see the sum)
    marked, basis_type = LAYOUTS[layout]
    seen = []
    hooks = [block.quad_interaction.mlp_sbf.register_forward_hook(
        lambda mod, args, out: seen.append((isinstance(args[0], basis_type), float(out.abs().max()))))
        for block in model.int_blocks]
    with torch.no_grad():
        padded = model.body(inputs.pos, inputs.atomic_numbers, graph, features)
        other = model.body(inputs.pos, inputs.atomic_numbers, marked(graph), features)
    for hook in hooks:
        hook.remove()
    assert [r for r, _ in seen] == [False, False, True, True] and min(v for _, v in seen) > 1e-3
    assert set(other) == set(padded)
    for key, ref in padded.items():
        if ref.is_floating_point():
            scale = float(ref.abs().max())
            torch.testing.assert_close(other[key], ref, rtol=0, atol=1e-10 * max(scale, 1.0), msg=key)
        else:
            assert torch.equal(other[key], ref), key


def test_contractions_are_the_padded_one():
    """The bilinear layer alone, with random bases: ragged, bucketed and padded give the same [E, out]."""
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
    for num_buckets in (1, 2, 3):  # 4 edges sum something: 2 buckets at most (2 edges each)
        buckets = edge_buckets(outer, inner, num_edges, num_buckets)
        assert len(buckets["edges"]) == min(num_buckets, 2)
        bucketed = bilinear(emb(**kwargs, buckets=buckets), m, outer, inner)
        torch.testing.assert_close(bucketed, padded, rtol=1e-12, atol=1e-12)
        assert torch.equal(bucketed[1], ragged[1])
    for bad in ({"ragged": True}, {"buckets": edge_buckets(outer, inner, num_edges)}):
        with pytest.raises(ValueError, match="idx_rad_inner"):
            emb(**kwargs, **bad, idx_rad_outer=outer, idx_rad_inner=inner, num_atoms=num_edges)


def test_edge_buckets():
    """Edges by count in runs of equal length, each padded to its own largest count, every
    size at least 2; edges that sum nothing in no bucket."""
    counts = torch.tensor([5, 0, 1, 9, 1, 2, 0, 3, 1, 7, 4])
    outer = torch.repeat_interleave(torch.arange(len(counts)), counts)
    inner = torch.cat([torch.arange(int(c)) for c in counts])
    b = edge_buckets(outer, inner, len(counts), num_buckets=3)
    assert [e.tolist() for e in b["edges"]] == [[2, 4, 8], [5, 7, 10], [0, 9, 3]]  # stable by count
    assert b["widths"] == (2, 4, 9)  # the first run's largest count is 1, padded to 2
    assert b["gather"].tolist() == [7, 0, 1, 9, 2, 4, 0, 5, 3, 8, 6]  # 0: sums nothing
    # every element once, in its edge's row of its bucket, at its own column
    assert sorted(torch.cat(b["elements"]).tolist()) == list(range(len(outer)))
    for edges, elements, rows, cols, width in zip(b["edges"], b["elements"], b["rows"], b["inner"], b["widths"]):
        assert torch.equal(edges[rows], outer[elements]) and torch.equal(cols, inner[elements])
        assert int(cols.max()) < width
    # few edges: fewer buckets, none of one edge; one edge: no buckets (the padded sum)
    assert len(edge_buckets(outer[:14], inner[:14], len(counts))["edges"]) == 1  # edges 0, 2 and 3
    assert edge_buckets(outer[:5], inner[:5], len(counts)) is None


def test_layout_by_kernel_threads():
    """The ragged sum is a scatter-add, atomic on more generated-kernel threads (slower than the
    padded sum there): the compiled path marks it only for a one-thread view, and buckets
    (slower than ragged on one thread) only for views on more."""
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
    assert BUCKETS not in one.fast_graph(inputs, graph)["quad_idx"]
    assert RAGGED not in two.fast_graph(inputs, graph)["quad_idx"]
    assert len(two.fast_graph(inputs, graph)["quad_idx"][BUCKETS]["edges"]) == 4
    for key in (RAGGED, BUCKETS):  # the eager model: the reference layout
        assert key not in model.fast_graph(inputs, graph)["quad_idx"]
    # the students' generated kernels stay on one thread whatever torch's count
    torch.set_num_threads(2)
    try:
        assert fast_model(build_preset("painn-tiny")).fast_path.kernel_threads == 1
    finally:
        torch.set_num_threads(before)
