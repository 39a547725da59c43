"""Where distillation targets come from: per-atom aggregates of a teacher's edge features.

``e2n`` (edge-to-node) and ``e2v`` (edge-to-vector) are computed here and only here, by the
models (when a caller asks for them) and therefore by stage one, which stores them.
"""

from __future__ import annotations

import torch


def aggregate_edge_features(
    edge: torch.Tensor,
    edge_index: torch.Tensor,
    edge_vector: torch.Tensor,
    num_atoms: int,
    want_e2n: bool = True,
    want_e2v: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum edge features onto their target atom, as scalars (e2n) and as vectors (e2v).

    Args:
        edge: ``[E, d]`` edge features.
        edge_index: ``[2, E]``; row 1 is the target atom t that each edge updates.
        edge_vector: ``[E, 3]`` unit vector of each edge.
        num_atoms: atoms in the batch (targets are ``0..num_atoms-1``).
        want_e2n: compute ``e2n [N, d]`` = Σ_{edges into t} edge.
        want_e2v: compute ``e2v [N, 3, d]`` = Σ_{edges into t} edge_vector ⊗ edge; it rotates
            with the structure (each unit vector does, edge features are invariant).

    Returns:
        dict with the keys ``"e2n"`` and/or ``"e2v"``.
    """
    target = edge_index[1]
    out: dict[str, torch.Tensor] = {}
    if want_e2n:
        e2n = edge.new_zeros(num_atoms, edge.shape[1])
        out["e2n"] = e2n.index_add_(0, target, edge)
    if want_e2v:
        outer = edge_vector.to(edge.dtype)[:, :, None] * edge[:, None, :]  # [E, 3, d]
        e2v = edge.new_zeros(num_atoms, 3, edge.shape[1])
        out["e2v"] = e2v.index_add_(0, target, outer)
    return out
