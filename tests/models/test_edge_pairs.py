"""The fast path's atom pairs (kdcache.models.common.with_edge_pairs): every edge belongs to one
pair whose representative is itself or its reverse, at a bit-identical distance, so a radial
filter computed once per pair is the filter of each of its edges. PaiNN's symmetric graph has
E / 2 pairs; SchNet's neighbour limit leaves single edges, which are pairs of their own."""

from __future__ import annotations

import pytest
import torch

from kdcache import keys as K
from kdcache.models.common import EDGE_PAIR, PAIR_EDGE, student_geometry, with_edge_pairs
from kdcache.models.presets import build_preset
from tests.models.test_fast import _batch, _molecule, _slab


@pytest.mark.parametrize("preset, symmetric", [("painn-tiny", True), ("schnet-tiny", False)])
@pytest.mark.parametrize("structure", ["slab", "molecule"])
def test_pairs_join_each_edge_with_its_reverse(preset, symmetric, structure):
    model = build_preset(preset)
    batch = _batch(_slab() if structure == "slab" else _molecule(), _molecule())
    inputs = model.prepare_inputs(batch, autograd_forces=False)
    graph = model.fast_graph(inputs, model.make_graph(inputs))
    assert graph[K.EDGE_INDEX].equal(model.make_graph(inputs)[K.EDGE_INDEX])  # the edges are unchanged
    ei, off = graph[K.EDGE_INDEX], graph[K.CELL_OFFSET]
    pair_edge, edge_pair = graph[PAIR_EDGE], graph[EDGE_PAIR]
    num_edges, num_pairs = ei.shape[1], pair_edge.shape[0]
    rep = pair_edge[edge_pair]  # each edge's representative
    same = (ei[:, rep] == ei).all(0) & (off[rep] == off).all(1)
    reverse = (ei[:, rep] == ei.flip(0)).all(0) & (off[rep] == -off).all(1)
    assert bool((same | reverse).all())
    assert bool((rep[rep] == rep).all()) and bool((pair_edge[edge_pair[pair_edge]] == pair_edge).all())
    # at most two edges a pair, and a pair of two is an edge and its reverse
    counts = torch.bincount(edge_pair, minlength=num_pairs)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 2
    _, _, dist, _ = student_geometry(inputs.pos, graph)
    assert torch.equal(dist[rep], dist)  # bit-identical: negation is exact
    if symmetric or structure == "molecule":  # (a molecule below the limit: every edge has its reverse)
        assert num_pairs * 2 == num_edges


def test_single_edges_are_pairs_of_their_own():
    """A neighbour limit that cuts: edges without their reverse get a pair each."""
    import kdcache.graph as G
    from kdcache.models.common import student_edges

    model = build_preset("schnet-tiny")
    batch = _batch(_slab())
    inputs = model.prepare_inputs(batch, autograd_forces=False)
    graph = student_edges(inputs, 6.0, 8, symmetric=False)  # 8 neighbours of ~40: many single edges
    graph = with_edge_pairs(inputs, graph)
    ei, off = graph[K.EDGE_INDEX], graph[K.CELL_OFFSET]
    ids = G.edge_ids(torch.cat((ei, ei.flip(0)), 1), torch.cat((off, -off)), inputs.pos.shape[0])
    has_reverse = torch.isin(ids[ei.shape[1]:], ids[: ei.shape[1]])
    assert 0 < int(has_reverse.sum()) < ei.shape[1]  # both kinds present
    counts = torch.bincount(graph[EDGE_PAIR])[graph[EDGE_PAIR]]
    assert torch.equal(counts == 2, has_reverse)
    assert graph[PAIR_EDGE].shape[0] == int((~has_reverse).sum()) + int(has_reverse.sum()) // 2
