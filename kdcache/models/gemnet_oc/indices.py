"""Triplet and quadruplet indices of GemNet-OC, from plain edge lists (no sparse-tensor library).

Edges are ``edge_index [2, E]`` with row 0 the source and row 1 the target (an edge c->a has
source c, target a) and integer ``cell_offset [E, 3]`` (kdcache convention: the source image is
``pos[s] - cell_offset @ cell``). Every index returned is sorted by its output edge, as the
padded-matrix aggregations in :mod:`kdcache.models.gemnet_oc.layers` require.
"""

from __future__ import annotations

import torch

from kdcache import keys as K

#: Key of a GemNet-OC graph dict: ``[E]`` long, the column of each edge in its target's row of a
#: padded ``[atoms, neighbours]`` matrix (:func:`inner_index` of the targets).
TARGET_NEIGHBOR_IDX = "target_neighbor_idx"
#: Key of a GemNet-OC graph dict / index dict: the padded width (python int, ``max + 1``) of its
#: :data:`TARGET_NEIGHBOR_IDX` / ``out_agg``, so the model's body sizes tensors without a host sync.
PAD_WIDTH = "pad_width"
#: Key of a GemNet-OC index dict (the compiled path's, :meth:`GemNetOC.fast_graph`): ``True``
#: where its bilinear sum runs over the triplets/quadruplets themselves, not a padded matrix
#: (:class:`~kdcache.models.gemnet_oc.layers.RaggedBasis`).
RAGGED = "ragged"
#: Key of a GemNet-OC index dict (the compiled path's, :meth:`GemNetOC.fast_graph`): the
#: :func:`edge_buckets` of its output edges, so that its bilinear sum runs over a few padded
#: matrices, one per group of edges with similar counts, instead of one padded to the largest
#: count of any edge (:class:`~kdcache.models.gemnet_oc.layers.BucketedBasis`).
BUCKETS = "buckets"
#: Buckets :func:`edge_buckets` makes where there are enough edges: enough to pad quadruplets
#: 1.2-1.3x (2.7-3.6x padded to the largest count; OC20-like slabs), few enough that each
#: bucket's matrix product stays large.
NUM_BUCKETS = 4


def inner_size(inner: torch.Tensor) -> int:
    """``max(inner) + 1`` (0 when empty): the width of the padded matrix an inner index fills."""
    return int(inner.max()) + 1 if inner.numel() else 0


def ragged_arange(counts: torch.Tensor) -> torch.Tensor:
    """Concatenated ranges: counts [1, 4, 0, 2] -> [0, 0, 1, 2, 3, 0, 1]."""
    total = int(counts.sum())
    if total == 0:
        return counts.new_zeros(0)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total, device=counts.device) - torch.repeat_interleave(starts, counts)


def inner_index(idx: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Position of each element within its run of equal values; ``idx`` must be sorted.

    [0 0 0 1 1 2 2 2 2] -> [0 1 2 0 1 0 1 2 3]: the column of each neighbour in a padded matrix.
    """
    return ragged_arange(torch.bincount(idx, minlength=dim_size))


def _edges_into(atoms: torch.Tensor, edge_index: torch.Tensor, num_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query position q, every edge whose target is ``atoms[q]``.

    Returns ``(query, edge)`` pairs grouped by query in query order; within a query the edges are
    ordered by (source, original position).

    """
    src, tgt = edge_index
    n = src.shape[0]
    key = tgt * num_atoms + src
    order = torch.sort(key, stable=True).indices  # CSR order of the edges by target
    counts = torch.bincount(tgt, minlength=num_atoms)
    rowptr = torch.cumsum(counts, 0) - counts
    per_query = counts[atoms]
    query = torch.repeat_interleave(torch.arange(atoms.shape[0], device=atoms.device), per_query)
    pos = torch.repeat_interleave(rowptr[atoms], per_query) + ragged_arange(per_query)
    edge = order[pos] if n else pos
    return query, edge


def get_triplets(graph: dict, num_atoms: int) -> dict:
    """Triplets b->a<-c of one graph: every input edge b->a for each output edge c->a.

    b may equal c if the two edges are different images; the edge itself is excluded.

    Returns:
        ``in`` (edge b->a), ``out`` (edge c->a), ``out_agg`` (position among the out-edge's inputs).
    """
    edge_index = graph[K.EDGE_INDEX]
    out, inp = _edges_into(edge_index[1], edge_index, num_atoms)
    keep = inp != out
    idx = {"in": inp[keep], "out": out[keep]}
    idx["out_agg"] = inner_index(idx["out"], edge_index.shape[1])
    return idx


def get_mixed_triplets(
    graph_in: dict,
    graph_out: dict,
    num_atoms: int,
    to_outedge: bool = False,
    return_agg_idx: bool = False,
) -> dict:
    """Triplets across two graphs on the same atoms.

    For each output edge c->a of ``graph_out``, every input edge b->a of ``graph_in`` into its
    target a (or, with ``to_outedge``, into its source c, i.e. b->c for the edge c->a). A pair is
    dropped when it closes on itself: same atom and same periodic image at both ends.

    Returns:
        ``in``, ``out`` and, with ``return_agg_idx``, ``out_agg``.
    """
    out_s, out_t = graph_out[K.EDGE_INDEX]
    in_s = graph_in[K.EDGE_INDEX][0]
    out, inp = _edges_into(out_s if to_outedge else out_t, graph_in[K.EDGE_INDEX], num_atoms)
    if to_outedge:
        other = out_t[out]
        offset_sum = graph_out[K.CELL_OFFSET][out] + graph_in[K.CELL_OFFSET][inp]
    else:
        other = out_s[out]
        offset_sum = graph_out[K.CELL_OFFSET][out] - graph_in[K.CELL_OFFSET][inp]
    keep = (in_s[inp] != other) | torch.any(offset_sum != 0, dim=-1)
    idx = {"in": inp[keep], "out": out[keep]}
    if return_agg_idx:
        idx["out_agg"] = inner_index(idx["out"], out_s.shape[0])
    return idx


def edge_buckets(out: torch.Tensor, out_agg: torch.Tensor, num_edges: int,
                 num_buckets: int = NUM_BUCKETS) -> dict | None:
    """Output edges grouped by how many elements (quadruplets) each one sums, for padded sums
    that are mostly not padding.

    The edges that sum at least one element are sorted by their count and cut into
    ``num_buckets`` runs of (nearly) equal length; each run is padded to its own largest count.
    Edges that sum nothing are in no bucket: their sum is the sum of nothing.

    Every size in the result is at least 2 (a size 0 or 1 would specialise the compiled code):
    fewer buckets where there are fewer than ``2 * num_buckets`` such edges, None under 2.

    Args:
        out: ``[T]`` the output edge of each element, sorted (as :func:`get_quadruplets` gives).
        out_agg: ``[T]`` the position of each element among its edge's (:func:`inner_index`).
        num_edges: output edges (rows of the padded matrix of the reference layout).
        num_buckets: buckets where there are enough edges.

    Returns:
        ``edges`` (per bucket ``[E_b]``: its edges, by count), ``elements`` (``[T_b]``: its
        elements), ``rows`` (``[T_b]``: each element's edge, as a row of the bucket),
        ``inner`` (``[T_b]``: its column), ``widths`` (per bucket the padded width, an int) and
        ``gather`` (``[num_edges]``: the row of each edge in ``[zero row; bucket 0 rows; ...]``,
        0 for an edge that sums nothing), or None.
    """
    counts = torch.bincount(out, minlength=num_edges)
    summing = torch.nonzero(counts).squeeze(1)
    n = summing.shape[0]
    if n < 2:
        return None
    order = summing[torch.sort(counts[summing], stable=True).indices]
    runs = torch.tensor_split(order, min(num_buckets, n // 2))
    bucket_of_edge = torch.full((num_edges,), -1, dtype=torch.long, device=out.device)
    row_of_edge = torch.zeros(num_edges, dtype=torch.long, device=out.device)
    gather = torch.zeros(num_edges, dtype=torch.long, device=out.device)
    gather[order] = torch.arange(1, n + 1, device=out.device)
    for b, run in enumerate(runs):
        bucket_of_edge[run] = b
        row_of_edge[run] = torch.arange(run.shape[0], device=out.device)
    bucket_of_element = bucket_of_edge[out]
    elements = [torch.nonzero(bucket_of_element == b).squeeze(1) for b in range(len(runs))]
    widths = [max(int(counts[run[-1]]), 2) for run in runs]  # sorted: the last count is the largest
    return {
        "edges": tuple(runs),
        "elements": tuple(elements),
        "rows": tuple(row_of_edge[out[e]] for e in elements),
        "inner": tuple(out_agg[e] for e in elements),
        "widths": tuple(widths),
        "gather": gather,
    }


def get_quadruplets(main_graph: dict, qint_graph: dict, num_atoms: int) -> dict:
    """Quadruplets d->b->a<-c: main edge d->b, quadruplet-graph edge b->a, main edge c->a.

    Returns:
        ``triplet_in`` ({in: d->b, out: b->a}), ``triplet_out`` ({in: b->a, out: c->a}),
        ``out`` (c->a per quadruplet), ``trip_in_to_quad``, ``trip_out_to_quad`` (the two triplets
        of each quadruplet) and ``out_agg``. Quadruplets with c = d (same image) are dropped.
    """
    main_s = main_graph[K.EDGE_INDEX][0]
    num_edges = main_s.shape[0]
    num_qint = qint_graph[K.EDGE_INDEX].shape[1]
    device = main_s.device

    trip_in = get_mixed_triplets(main_graph, qint_graph, num_atoms, to_outedge=True)  # d->b->a
    trip_out = get_mixed_triplets(qint_graph, main_graph, num_atoms, to_outedge=False)  # c->a<-b

    # every output triplet c->a<-b pairs with every input triplet d->b->a on the same edge b->a
    n_in_per_inter = torch.bincount(trip_in["out"], minlength=num_qint)
    first_in_per_inter = torch.cumsum(n_in_per_inter, 0) - n_in_per_inter
    reps = n_in_per_inter[trip_out["in"]]
    out = torch.repeat_interleave(trip_out["out"], reps)
    inter = torch.repeat_interleave(trip_out["in"], reps)
    trip_out_to_quad = torch.repeat_interleave(torch.arange(trip_out["out"].shape[0], device=device), reps)
    # trip_in is sorted by its out edge, so the partners of b->a are a contiguous block
    trip_in_to_quad = first_in_per_inter[inter] + ragged_arange(reps)

    d_edge = trip_in["in"][trip_in_to_quad]
    offset_cd = (
        main_graph[K.CELL_OFFSET][d_edge] + qint_graph[K.CELL_OFFSET][inter] - main_graph[K.CELL_OFFSET][out]
    )
    keep = (main_s[out] != main_s[d_edge]) | torch.any(offset_cd != 0, dim=-1)

    idx = {
        "triplet_in": trip_in,
        "triplet_out": trip_out,
        "out": out[keep],
        "trip_out_to_quad": trip_out_to_quad[keep],
        "trip_in_to_quad": trip_in_to_quad[keep],
    }
    idx["out_agg"] = inner_index(idx["out"], num_edges)
    return idx
