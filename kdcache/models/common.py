"""What the students (PaiNN, SchNet) share beyond the contract: their radius graph.

Model-neutral and public, below both students (SchNet never imports from ``painn.py``), and
never from the teacher's package: a student run must not import :mod:`kdcache.models.gemnet_oc`.
"""

from __future__ import annotations

import torch

from kdcache import graph as G
from kdcache import keys as K
from kdcache.models.base import ModelInputs


def student_edges(inputs, cutoff: float, max_neighbors: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """The radius graph PaiNN and SchNet use (a model's :meth:`~kdcache.models.base.PotentialModel.make_graph`).

    At most ``max_neighbors`` nearest neighbours per target atom (strict, as the reference
    models' graph generation), periodic images where ``structures.pbc`` allows. ``symmetric``:
    keep one direction of every pair and add its reverse, PaiNN's rule (for an atom's own
    images, the reference applies the rule to the un-negated offsets, hence
    ``keep_self_image="positive"``).

    Args:
        inputs: the prepared batch (:class:`kdcache.models.base.ModelInputs`; its radius graph
            comes from the batch's neighbour list when there is one).
        cutoff: radius (Å).
        max_neighbors: neighbour limit per target atom.
        symmetric: make the edge set symmetric (PaiNN) or not (SchNet).

    Returns:
        ``edge_index [2, E]`` (source, target), ``cell_offset [E, 3]`` and ``edge_shift [E, 3]``
        (:func:`kdcache.graph.edge_shifts`; :func:`student_geometry` turns it into distances).
    """
    cell, _, natoms, batch = inputs.structures
    edge_index, offset, _ = inputs.radius_graph(cutoff, max_neighbors, strict=True)

    def derive():
        ei, off = edge_index, offset
        if symmetric:
            sym = G.symmetrize_edges(ei, off, batch, natoms.shape[0], keep_self_image="positive")
            ei, off = sym.edge_index, sym.cell_offset
        shift = G.edge_shifts(cell, batch, ei, off, inputs.pos.dtype)
        return {K.EDGE_INDEX: ei, K.CELL_OFFSET: off, G.EDGE_SHIFT: shift}

    # owner: one cache entry per graph kind (a PaiNN and a SchNet may share a neighbour list)
    return inputs.derived((student_edges, cutoff, max_neighbors, symmetric), (edge_index, offset), derive)


#: graph keys of :func:`with_edge_pairs`: ``[P]`` one edge of each atom pair (its representative),
#: and ``[E]`` the pair of each edge (the fast path's only; the eager graph has neither)
PAIR_EDGE, EDGE_PAIR = "pair_edge", "edge_pair"


def with_edge_pairs(inputs, graph: dict) -> dict:
    """``graph`` with its edges grouped into atom pairs: an edge ``(s, t, o)`` and its reverse
    ``(t, s, -o)``, where both are present, form one pair (``PAIR_EDGE [P]``, ``EDGE_PAIR [E]``).

    Why: a radial filter (a network of the distance alone: PaiNN's ``rbf_proj``, SchNet's filter
    network) has the same value on both edges of a pair — their distances are bit-identical, as
    negation is exact — so computing it once per pair and gathering it per edge does up to half
    the work of the largest per-edge matrix products. PaiNN's graph is symmetric (P = E / 2);
    SchNet's neighbour limit leaves some edges without their reverse (their own pair).

    Args:
        inputs: the prepared batch (the pairs are reused by its neighbour list, in MD).
        graph: a :func:`student_edges` graph.
    """
    edge_index, offset = graph[K.EDGE_INDEX], graph[K.CELL_OFFSET]

    def derive():
        num_edges = edge_index.shape[1]
        # one id space for both directions (edge_ids needs the offsets' range of both signs)
        ids = G.edge_ids(torch.cat((edge_index, edge_index.flip(0)), dim=1), torch.cat((offset, -offset)),
                         inputs.pos.shape[0])
        pair_id = torch.minimum(ids[:num_edges], ids[num_edges:])  # the same for an edge and its reverse
        _, edge_pair = torch.unique(pair_id, return_inverse=True)
        num_pairs = int(edge_pair.max()) + 1 if num_edges else 0
        first = torch.full((num_pairs,), num_edges, dtype=torch.long, device=edge_pair.device)
        pair_edge = first.scatter_reduce(0, edge_pair, torch.arange(num_edges, device=edge_pair.device), "amin")
        return {PAIR_EDGE: pair_edge, EDGE_PAIR: edge_pair}

    return {**graph, **inputs.derived((with_edge_pairs,), (edge_index, offset), derive)}


def student_geometry(pos: torch.Tensor, graph: dict):
    """``src [E]``, ``dst [E]``, ``distance [E]`` and ``edge_vector [E, 3]`` (kdcache sign: unit
    vector from the source image to the target) of a :func:`student_edges` graph, differentiable in ``pos``."""
    edge_index = graph[K.EDGE_INDEX]
    distance, edge_vector = G.edge_vectors(pos, edge_index, graph[G.EDGE_SHIFT])
    return edge_index[0], edge_index[1], distance, edge_vector


def student_graph(pos: torch.Tensor, structures: G.Structures, cutoff: float, max_neighbors: int, symmetric: bool):
    """:func:`student_edges` then :func:`student_geometry`: ``src``, ``dst``, ``distance``,
    ``edge_vector`` of the student graph of ``pos`` (a fresh radius graph).

    Args:
        pos: ``[N, 3]`` positions (may require grad; the graph itself does not).
        structures: cell, pbc, natoms and structure index (:func:`kdcache.graph.batch_structures`).
        cutoff: radius (Å).
        max_neighbors: neighbour limit per target atom.
        symmetric: make the edge set symmetric (PaiNN) or not (SchNet).
    """
    inputs = ModelInputs(None, pos, None, structures)
    return student_geometry(pos, student_edges(inputs, cutoff, max_neighbors, symmetric))


__all__ = ["EDGE_PAIR", "PAIR_EDGE", "student_edges", "student_geometry", "student_graph", "with_edge_pairs"]
