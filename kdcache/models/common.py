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


__all__ = ["student_edges", "student_geometry", "student_graph"]
