"""Radius graphs with periodic images, nearest-neighbour limits and symmetric edge sets.

Every model consumes the graph built here, so the semantics follow the Open Catalyst reference
code (fairchem ~1.10, ``radius_graph_pbc`` + ``get_max_neighbors_mask`` and GemNet-OC's
``subselect_edges`` / ``symmetrize_edges``) edge for edge, including the order of the edges.

Conventions (``kdcache.keys``):

* ``edge_index[0]`` is the source ``s`` (the neighbour), ``edge_index[1]`` the target ``t``
  (the atom whose neighbourhood it is, the atom the message updates). Edges come sorted by target.
* ``cell_offset`` ``o`` (integers) is defined so that the edge vector, from the source image to the
  target, is ``pos[t] - pos[s] + o @ cell``. fairchem's ``radius_graph_pbc`` returns the opposite
  sign (it shifts the *neighbour* by ``+n @ cell``); GemNet-OC negates it right after
  (``cell_offsets = -graph.cell_offsets``) and the reference ``reference.npz`` stores the negated
  one, so we store GemNet-OC's sign: ``o = -n``. PaiNN/SchNet use ``pos[s] - pos[t] + n @ cell``,
  which is just ``-edge_vector`` here.
* ``edge_vector`` is the unit vector of that edge vector, ``distance`` its length.

Everything is batched tensor code (no Python loop over atoms or structures) and runs on the
device of ``pos``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from kdcache import keys as K
from kdcache.errors import DataError

__all__ = [
    "DISTANCE", "NEIGHBORS", "ID_SWAP", "EDGE_SHIFT", "SymmetricEdges",
    "radius_graph_pbc", "edge_geometry", "edge_shifts", "edge_vectors", "NeighborList", "nearest_neighbor_mask", "image_repetitions",
    "select_edges", "mask_edges", "symmetrize_edges", "symmetrize_graph", "counter_edges",
    "edge_ids", "build_graph", "Structures", "batch_structures",
]

#: Keys of a graph dict beyond ``kdcache.keys`` (used only between graph code and models).
DISTANCE = "distance"    # [E] float: |pos[t] - pos[s] + o @ cell|
NEIGHBORS = "neighbors"  # [S] long: edges per structure
ID_SWAP = "id_swap"      # [E] long: index of the counter edge (t -> s, -o) of each edge
EDGE_SHIFT = "edge_shift"  # [E, 3] float: o @ cell of each edge (edge_shifts), positions-independent

#: Pairs closer than this (Å) are never edges: the reference drops squared distances <= 1e-4
#: to remove an atom's zero-offset self pair (and, as a side effect, overlapping atoms).
MIN_DISTANCE_SQ = 1e-4
#: Tie tolerance of the non-strict neighbour limit, in the units of the ranking key (the
#: reference ranks by *squared* distance in ``radius_graph_pbc`` and by distance in GemNet-OC's
#: ``subselect_edges``; we keep both, see ``nearest_neighbor_mask``).
DEGENERACY_TOLERANCE = 0.01
#: Candidate (target, source, image) triples evaluated at once; bounds peak memory for big or
#: many-image batches (each candidate costs ~100 bytes of temporaries).
DEFAULT_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# periodic images
# --------------------------------------------------------------------------------------------
def image_repetitions(
    pos: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    natoms: torch.Tensor,
    cutoff: float,
    lattice_planes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """How many cell repetitions ``r`` (images ``-r..r``) each structure needs per direction.

    The reference uses ``ceil(cutoff / d_k)`` with ``d_k`` the distance between lattice planes
    (``1 / |reciprocal vector k|``); that is enough only when atoms lie inside the cell. We also
    account for the spread of the atoms' fractional coordinates, so unwrapped positions are
    complete too; for atoms inside the cell the result is the reference's.

    Only periodic directions are used: the reciprocal vectors are those of the lattice spanned by
    the periodic lattice vectors alone (``(B Bᵀ)⁻¹ B``), so a slab with ``pbc=[T, T, F]`` and an
    arbitrary (even zero) third vector works, and a molecule (no periodic direction) gets zeros.

    Args:
        pos: ``[N, 3]`` positions.
        cell: ``[S, 3, 3]`` lattice vectors as rows.
        pbc: ``[S, 3]`` bool.
        natoms: ``[S]`` atoms per structure.
        cutoff: radius in Å.
        lattice_planes: ``_lattice_planes(cell, pbc)``, when the caller keeps it (a
            :class:`NeighborList`: the cell is fixed between its builds).

    Returns:
        ``[S, 3]`` long, zero along non-periodic directions.
    """
    num_structures = natoms.shape[0]
    with torch.no_grad():
        reciprocal, inv_plane = lattice_planes if lattice_planes is not None else _lattice_planes(cell, pbc)
        if pos.shape[0] == 0:
            return torch.zeros(num_structures, 3, dtype=torch.long, device=pos.device)
        batch = torch.repeat_interleave(torch.arange(num_structures, device=pos.device), natoms)
        frac = torch.einsum("nj,nkj->nk", pos.detach().to(torch.float64), reciprocal[batch])
        index = batch[:, None].expand(-1, 3)
        lo = torch.full((num_structures, 3), math.inf, dtype=torch.float64, device=pos.device)
        hi = torch.full((num_structures, 3), -math.inf, dtype=torch.float64, device=pos.device)
        lo = lo.scatter_reduce(0, index, frac, "amin")
        hi = hi.scatter_reduce(0, index, frac, "amax")
        spread = (hi - lo).clamp(min=0.0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        # An image n along k can hold an edge only if |n + Δfrac| / |b*_k| <= cutoff, with
        # |Δfrac| <= spread: |n| <= cutoff |b*_k| + spread. For atoms inside the cell (spread < 1)
        # this never exceeds the reference's ceil(cutoff |b*_k|), which we keep as the minimum.
        # (Non-periodic directions have inv_plane 0 and are zeroed: their reciprocal row is 0.)
        reach = cutoff * inv_plane
        reps = torch.maximum(torch.ceil(reach), torch.floor(reach + spread + 1e-6))
        reps = torch.where(pbc, reps, torch.zeros_like(reps))
        return reps.long()


def _lattice_planes(cell: torch.Tensor, pbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell-only part of :func:`image_repetitions`: reciprocal rows ``[S, 3, 3]`` (float64)
    of the periodic lattice and ``1 / plane spacing [S, 3]`` (0 along non-periodic directions).

    Raises:
        DataError: the lattice vectors of a periodic direction are degenerate.
    """
    with torch.no_grad():
        # float64: the repetition count must not flip on rounding (a missed image = missed edge).
        lattice = cell.detach().to(torch.float64) * pbc[:, :, None]
        gram = lattice @ lattice.transpose(1, 2)
        # Non-periodic rows/columns of the Gram matrix are zero: put 1 on their diagonal so the
        # system is solvable; their reciprocal rows then come out zero (lattice row is zero).
        gram = gram + torch.diag_embed((~pbc).to(torch.float64))
        reciprocal, info = torch.linalg.solve_ex(gram, lattice)  # rows: b*_k with b*_k·a_l = δ_kl
        inv_plane = reciprocal.norm(dim=-1)  # [S, 3] 1 / plane spacing
        length = lattice.norm(dim=-1)
        ok = (info == 0)[:, None] & torch.isfinite(inv_plane) & (inv_plane * length < 1e8)
        bad = pbc & ~ok
        if bool(bad.any()):
            s = int(bad.any(dim=1).nonzero()[0, 0])
            raise DataError(
                "<batch>", s, K.CELL,
                f"the lattice vectors of the periodic directions are degenerate: {cell[s].tolist()}",
            )
        return reciprocal, inv_plane


def _check_inputs(pos, cell, pbc, natoms):
    num_structures = natoms.shape[0]
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise DataError("<batch>", None, K.POSITIONS, f"expected shape [N, 3], got {list(pos.shape)}")
    if int(natoms.sum()) != pos.shape[0]:
        raise DataError(
            "<batch>", None, K.NATOMS,
            f"natoms sums to {int(natoms.sum())} but there are {pos.shape[0]} positions",
        )
    natoms = natoms.to(device=pos.device, dtype=torch.long)
    cell = cell.reshape(num_structures, 3, 3).to(device=pos.device, dtype=pos.dtype)
    pbc = torch.as_tensor(pbc, device=pos.device).bool()
    if pbc.dim() == 1:
        pbc = pbc.expand(num_structures, 3)
    pbc = pbc.reshape(num_structures, 3)
    finite_pos = torch.isfinite(pos).all(dim=1)
    finite_cell = torch.isfinite(cell).flatten(1).all(dim=1)
    if not bool(finite_pos.all() & finite_cell.all()):
        batch = torch.repeat_interleave(torch.arange(num_structures, device=pos.device), natoms)
        bad_pos = batch[~finite_pos]
        if bad_pos.numel():
            raise DataError("<batch>", int(bad_pos[0]), K.POSITIONS, "positions are not finite")
        raise DataError("<batch>", int((~finite_cell).nonzero()[0, 0]), K.CELL, "cell is not finite")
    return cell, pbc, natoms


def _image_grid(cell: torch.Tensor, reps: torch.Tensor, dtype: torch.dtype):
    """The batch-wide grid of neighbour shifts ``n`` and their Cartesian shifts per structure.

    One place for the numbers every distance of the radius graph is formed from, so that a graph
    refined from a neighbour list (:class:`NeighborList`) ranks edges by bit-identical distances.

    Returns:
        ``grid_reps [3]`` (the grid spans ``-r..r`` per direction, ``n1`` slowest),
        ``grid [C, 3]`` shifts ``n`` (in ``dtype``), ``shift_table [S, C, 3]`` = ``n @ cell`` per
        structure (one batched matmul, as the reference) and ``allowed [S, C]`` (the shift lies
        within the structure's own repetitions).
    """
    device = cell.device
    num_structures = cell.shape[0]
    grid_reps = reps.max(dim=0).values if num_structures else reps.new_zeros(3)
    axes = [torch.arange(-int(r), int(r) + 1, device=device, dtype=dtype) for r in grid_reps]
    grid = torch.cartesian_prod(*axes).reshape(-1, 3)  # [C, 3], n1 slowest
    shift_table = torch.bmm(
        cell.transpose(1, 2), grid.T.unsqueeze(0).expand(num_structures, -1, -1)
    ).transpose(1, 2)  # [S, C, 3]
    allowed = (grid.abs()[None, :, :] <= reps[:, None, :].to(dtype)).all(dim=-1)  # [S, C]
    return grid_reps, grid, shift_table, allowed


def _squared_distance(pos_t: torch.Tensor, pos_s: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``|pos_t - (pos_s + shift)|²`` in the reference's operation order (broadcasting)."""
    vec = pos_t - (pos_s + shift)
    return vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1] + vec[..., 2] * vec[..., 2]


def _candidate_edges(pos, cell, natoms, reps, cutoff, chunk_size):
    """All (target, source, image) triples within ``cutoff`` in the reference's order.

    The order is: structure, target t, source s, then the neighbour shift ``n = -o`` in
    lexicographic order (``n1`` slowest) — what fairchem's ``torch.cartesian_prod`` produces.
    Atom pairs are enumerated sparsely (only pairs within a structure); images form a dense
    inner dimension over the batch-wide grid of shifts, masked per structure to its own
    repetitions (a molecule in a batch of crystals gets no images).
    """
    device = pos.device
    num_structures = natoms.shape[0]
    cutoff_sq = cutoff * cutoff
    # Cartesian shifts of all images, tabulated per structure with one batched matmul as the
    # reference does, and distances formed as ``pos[t] - (pos[s] + shift)`` in its operation
    # order: exactly tied distances (an atom's own images) must round the same way so that a
    # strict neighbour limit cuts the same ties.
    _, grid, shift_table, allowed = _image_grid(cell, reps, pos.dtype)
    num_cells = grid.shape[0]
    grid_offset = -grid.long()  # kdcache sign (see module docstring)

    pairs = natoms * natoms
    ends = torch.cumsum(pairs, 0)
    starts = ends - pairs
    atom_start = torch.cumsum(natoms, 0) - natoms
    total = int(ends[-1]) if num_structures else 0
    pairs_per_chunk = max(1, chunk_size // num_cells)

    targets, sources, offsets, dist_sq = [], [], [], []
    for start in range(0, total, pairs_per_chunk):  # loop over memory chunks, not over atoms
        pid = torch.arange(start, min(start + pairs_per_chunk, total), device=device)
        s = torch.searchsorted(ends, pid, right=True)
        local = pid - starts[s]
        n_s = natoms[s]
        t = local // n_s + atom_start[s]
        j = local % n_s + atom_start[s]
        dsq = _squared_distance(pos[t][:, None, :], pos[j][:, None, :], shift_table[s])  # [P, C]
        keep = (dsq <= cutoff_sq) & (dsq > MIN_DISTANCE_SQ) & allowed[s]
        p_idx, c_idx = keep.nonzero(as_tuple=True)  # row-major: pair order, then image order
        targets.append(t[p_idx])
        sources.append(j[p_idx])
        offsets.append(grid_offset[c_idx])
        dist_sq.append(dsq[p_idx, c_idx])
    if not targets:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty.view(0, 3), pos.new_zeros(0)
    return torch.cat(targets), torch.cat(sources), torch.cat(offsets), torch.cat(dist_sq)


# --------------------------------------------------------------------------------------------
# neighbour limit
# --------------------------------------------------------------------------------------------
def nearest_neighbor_mask(
    target: torch.Tensor,
    key: torch.Tensor,
    num_atoms: int,
    max_neighbors: int | None,
    enforce_max_neighbors_strictly: bool = False,
    tolerance: float = DEGENERACY_TOLERANCE,
    tie_break: str = "reference",
) -> torch.Tensor:
    """Which edges to keep so that every target has at most ``max_neighbors`` (nearest first).

    Same rule as the reference's ``get_max_neighbors_mask``:

    * strict: the ``max_neighbors`` smallest ``key`` per target;
    * not strict: every edge whose key is ``<=`` the key of the ``(max_neighbors+1)``-th nearest
      plus ``tolerance``, so near-degenerate shells are kept whole (a target may then keep more
      than ``max_neighbors``). This does not depend on how ties are ordered.

    Which of exactly equal keys a strict cut keeps (an atom's own images in a small cell are
    exact ties) is decided by ``tie_break``:

    * ``"reference"``: as fairchem — each target's keys laid out in input order in a row padded
      with ``inf`` to the largest neighbour count of the batch, rows sorted with torch's default
      (unstable) sort. Reproduces the reference graphs edge for edge on the same device type,
      but, as in the reference, a tie can then be cut differently in a different batch.
    * ``"stable"``: the earliest edge in input order wins; independent of the batch and device.

    ``key`` is whatever the caller ranks by; the tolerance is in its units (the reference uses
    squared distances in ``radius_graph_pbc`` and distances in GemNet-OC's ``subselect_edges``).

    Args:
        target: ``[E]`` target atom of each edge, sorted (edges grouped by target).
        key: ``[E]`` ranking key (distance or squared distance).
        num_atoms: atoms in the batch.
        max_neighbors: the limit; ``None`` or ``<= 0`` keeps everything (as the reference).
        enforce_max_neighbors_strictly: see above.
        tolerance: tie tolerance of the non-strict rule.
        tie_break: ``"reference"`` or ``"stable"``.

    Returns:
        ``[E]`` bool mask.
    """
    if tie_break not in ("reference", "stable"):
        raise ValueError(f"tie_break must be 'reference' or 'stable', not {tie_break!r}")
    num_edges = target.shape[0]
    keep_all = torch.ones(num_edges, dtype=torch.bool, device=target.device)
    if max_neighbors is None or max_neighbors <= 0 or num_edges == 0:
        return keep_all
    if num_edges > 1 and bool((target[1:] < target[:-1]).any()):
        raise ValueError("nearest_neighbor_mask: edges must be sorted by target")
    counts = torch.bincount(target, minlength=num_atoms)
    width = int(counts.max())
    if width <= max_neighbors:
        return keep_all
    key = key.detach()
    first = torch.cumsum(counts, 0) - counts
    if enforce_max_neighbors_strictly and tie_break == "reference":
        return _reference_strict_mask(target, key, first, num_atoms, width, max_neighbors)
    # Rank of each edge within its target by (key, input position): stable sort by key, then
    # stable sort by target.
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(target[order], stable=True)]
    target_sorted = target[order]
    key_sorted = key[order]
    rank = torch.arange(num_edges, device=target.device) - first[target_sorted]
    if enforce_max_neighbors_strictly:
        keep_sorted = rank < max_neighbors
    else:
        crowded = counts > max_neighbors
        kth = torch.full((num_atoms,), math.inf, dtype=key.dtype, device=key.device)
        kth[crowded] = key_sorted[first[crowded] + max_neighbors] + tolerance
        keep_sorted = key_sorted <= kth[target_sorted]
    mask = torch.zeros_like(keep_all)
    mask[order] = keep_sorted
    return mask


def _reference_strict_mask(target, key, first, num_atoms: int, width: int, max_neighbors: int) -> torch.Tensor:
    """The strict cut with fairchem's tie-break (see ``nearest_neighbor_mask``).

    Args:
        target: ``[E]`` sorted target of each edge.
        key: ``[E]`` ranking key (detached).
        first: index of each target's first edge.
        num_atoms: atoms in the batch.
        width: the largest neighbour count of the batch.
        max_neighbors: the limit.

    Returns:
        ``[E]`` bool mask.
    """
    slot = torch.arange(target.shape[0], device=target.device) - first[target]  # position within target
    table = torch.full((num_atoms, width), math.inf, dtype=key.dtype, device=key.device)
    table[target, slot] = key
    sorted_key, sorted_slot = torch.sort(table, dim=1)  # unstable on purpose (see above)
    chosen = sorted_slot[:, :max_neighbors] + first[:, None]
    chosen = chosen[torch.isfinite(sorted_key[:, :max_neighbors])]
    mask = torch.zeros(target.shape[0], dtype=torch.bool, device=target.device)
    mask[chosen] = True
    return mask


# --------------------------------------------------------------------------------------------
# the radius graph
# --------------------------------------------------------------------------------------------
def radius_graph_pbc(
    pos: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    natoms: torch.Tensor,
    cutoff: float,
    max_neighbors: int | None,
    enforce_max_neighbors_strictly: bool = False,
    tie_break: str = "reference",
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Radius graph over a batch of structures with periodic images and a neighbour limit.

    Edges are all (source image, target) pairs with ``1e-4 < |d|² <= cutoff²`` (so an atom
    sees its own periodic images but not itself), then limited to ``max_neighbors`` nearest per
    target by squared distance (``nearest_neighbor_mask``). Same edges and order as fairchem's
    ``radius_graph_pbc`` with the offset sign of GemNet-OC (see the module docstring). Differences
    on purpose: pbc may differ between structures of a batch; positions outside the cell are
    still complete; ``max_neighbors <= 0`` gives true counts in ``neighbors``.

    Args:
        pos: ``[N, 3]`` positions (any float dtype; the graph is not differentiable, use
            ``edge_geometry`` for distances with gradients).
        cell: ``[S, 3, 3]`` lattice vectors as rows (ignored along non-periodic directions;
            zeros for molecules).
        pbc: ``[S, 3]`` bool (or ``[3]`` for all structures).
        natoms: ``[S]`` atoms per structure; atoms of a structure are contiguous in ``pos``.
        cutoff: radius in Å (inclusive).
        max_neighbors: most neighbours per target atom; ``None``/``<= 0`` for no limit.
        enforce_max_neighbors_strictly: cut exactly at ``max_neighbors`` even inside a shell of
            (near-)equal distances; else keep shells within 0.01 Å² whole (the reference default
            of this function; the models' ``generate_graph`` defaults to strict).
        tie_break: how a strict cut orders exactly equal distances (``nearest_neighbor_mask``).
        chunk_size: candidate triples evaluated at once (memory bound only).

    Returns:
        ``edge_index [2, E]`` long (row 0 source, row 1 target, sorted by target),
        ``cell_offset [E, 3]`` long, ``neighbors [S]`` long (edges per structure).
    """
    cell, pbc, natoms = _check_inputs(pos, cell, pbc, natoms)
    with torch.no_grad():
        reps = image_repetitions(pos, cell, pbc, natoms, cutoff)
        t, s, o, dsq = _candidate_edges(pos.detach(), cell.detach(), natoms, reps, cutoff, chunk_size)
        return _limit_neighbors(t, s, o, dsq, natoms, pos.shape[0], max_neighbors, enforce_max_neighbors_strictly,
                                tie_break)


def _limit_neighbors(t, s, o, dsq, natoms, num_atoms: int, max_neighbors, strict: bool, tie_break: str):
    """The neighbour limit on candidate edges (in the reference's order) and the edge counts:
    the tail of :func:`radius_graph_pbc`, shared with :meth:`NeighborList.radius_graph`."""
    mask = nearest_neighbor_mask(t, dsq, num_atoms, max_neighbors, strict, tie_break=tie_break)
    if not bool(mask.all()):
        t, s, o = t[mask], s[mask], o[mask]
    batch = torch.repeat_interleave(torch.arange(natoms.shape[0], device=natoms.device), natoms)
    neighbors = torch.bincount(batch[t], minlength=natoms.shape[0])
    return torch.stack((s, t)), o, neighbors


def edge_shifts(
    cell: torch.Tensor,
    batch: torch.Tensor,
    edge_index: torch.Tensor,
    cell_offset: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cartesian shift ``o @ cell`` of each edge's source image, ``[E, 3]``.

    It depends on the cell only, not on the positions: a model's graph can carry it, built once
    per structure, while the positions change (molecular dynamics, :class:`NeighborList`).

    Args:
        cell: ``[S, 3, 3]``.
        batch: ``[N]`` structure of each atom.
        edge_index: ``[2, E]`` (source, target).
        cell_offset: ``[E, 3]`` integer offsets (kdcache sign).
        dtype: floating dtype of the result (default: the cell's).
    """
    dtype = cell.dtype if dtype is None else dtype
    return torch.einsum("ek,ekj->ej", cell_offset.to(dtype), cell.to(dtype)[batch[edge_index[1]]])


def edge_vectors(pos: torch.Tensor, edge_index: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Length and unit vector of ``pos[t] - pos[s] + shift`` per edge (differentiable in ``pos``).

    Args:
        pos: ``[N, 3]``.
        edge_index: ``[2, E]`` (source, target).
        shift: ``[E, 3]`` from :func:`edge_shifts`.
    """
    s, t = edge_index[0], edge_index[1]
    vec = pos[t] - pos[s] + shift
    distance = vec.norm(dim=-1)
    return distance, vec / distance[:, None]


def edge_geometry(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    edge_index: torch.Tensor,
    cell_offset: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Length and unit vector of each edge, differentiable w.r.t. ``pos`` (and ``cell``).

    Args:
        pos: ``[N, 3]``.
        cell: ``[S, 3, 3]``.
        batch: ``[N]`` structure of each atom.
        edge_index: ``[2, E]`` (source, target).
        cell_offset: ``[E, 3]`` integer offsets (kdcache sign).

    Returns:
        ``distance [E]`` and ``edge_vector [E, 3]`` = ``(pos[t] - pos[s] + o @ cell) / distance``.
    """
    return edge_vectors(pos, edge_index, edge_shifts(cell, batch, edge_index, cell_offset, pos.dtype))


# --------------------------------------------------------------------------------------------
# neighbour lists (molecular dynamics)
# --------------------------------------------------------------------------------------------
class NeighborList:
    """A Verlet neighbour list: the radius graphs of one structure (or batch) whose atoms move.

    Built as every pair within ``cutoff + skin`` (no neighbour limit) and reused while no atom
    has moved more than ``skin / 2`` since the build: a pair within ``cutoff`` now was within
    ``cutoff + skin`` then. Each :meth:`radius_graph` re-forms the squared distances of the listed
    pairs from the current positions exactly as :func:`radius_graph_pbc` does (the same shift
    table, the same operation order), keeps those within the cutoff and applies the same
    neighbour limit: the result is the fresh graph, edge for edge and in the same order, with
    exact ties cut the same way. The work saved is the pair search over all periodic images.

    :meth:`cached` goes one step further for a model: the work derived from its edge sets
    (symmetrisation, triplets, per-edge shifts, ...) is reused while they are unchanged.

    A list belongs to one set of atoms. Cell, pbc and atom counts are checked on every call (a
    change rebuilds); atomic numbers and tags are the caller's to keep (the ASE calculator starts
    a new list whenever anything but the positions changes).

    Args:
        skin: Å, >= 0 (0 rebuilds whenever an atom moved at all).

    Attributes:
        builds: pair searches done so far (the first, and every rebuild).
    """

    def __init__(self, skin: float) -> None:
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.skin = float(skin)
        self.builds = 0
        self._built: dict | None = None  # cutoff, pos, cell, pbc, natoms; candidate t, s, n = -o
        self._step: tuple[tuple, dict] | None = None  # (pos, cell, pbc, natoms), {request: graph}
        self._memo: dict = {}  # owner -> (generation, key, value)
        self._generation = 0  # bumped by every build: cached graphs carry cell-dependent shifts

    def _stale(self, pos: torch.Tensor, cell, pbc, natoms, cutoff: float) -> bool:
        b = self._built
        if b is None or cutoff > b["cutoff"] or b["pos"].shape != pos.shape or b["pos"].dtype != pos.dtype:
            return True
        if not (torch.equal(b["natoms"], natoms) and torch.equal(b["pbc"], pbc) and torch.equal(b["cell"], cell)):
            return True
        moved_sq = (pos - b["pos"]).square().sum(dim=-1)
        return bool(moved_sq.max() > (self.skin / 2) ** 2) if moved_sq.numel() else False

    def _build(self, pos: torch.Tensor, cell, pbc, natoms, cutoff: float) -> None:
        edge_index, offset, _ = radius_graph_pbc(pos, cell, pbc, natoms, cutoff + self.skin, None)
        batch = torch.repeat_interleave(torch.arange(natoms.shape[0], device=pos.device), natoms)
        self._built = dict(cutoff=float(cutoff), pos=pos.clone(), cell=cell.clone(), pbc=pbc.clone(),
                           natoms=natoms.clone(), t=edge_index[1], s=edge_index[0], n=-offset,
                           structure=batch[edge_index[1]], periodic=bool(pbc.any()),
                           planes=_lattice_planes(cell, pbc), grids={})
        self.builds += 1
        self._generation += 1

    def radius_graph(
        self,
        pos: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        natoms: torch.Tensor,
        cutoff: float,
        max_neighbors: int | None,
        enforce_max_neighbors_strictly: bool = False,
        tie_break: str = "reference",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`radius_graph_pbc` of the current positions, from the list (same arguments and
        results; the graph is not differentiable)."""
        cell, pbc, natoms = _check_inputs(pos, cell, pbc, natoms)
        request = (float(cutoff), max_neighbors, bool(enforce_max_neighbors_strictly), tie_break)
        with torch.no_grad():
            pos = pos.detach()
            state = (pos, cell.detach(), pbc, natoms)
            if self._step is None or not all(a.shape == b.shape and torch.equal(a, b)
                                             for a, b in zip(self._step[0], state)):
                self._step = (tuple(t.clone() for t in state), {})
            results = self._step[1]
            if request not in results:
                if self._stale(pos, cell, pbc, natoms, request[0]):
                    self._build(pos, cell, pbc, natoms, request[0])
                results[request] = self._refine(pos, cell, pbc, natoms, *request)
            return results[request]

    def _refine(self, pos, cell, pbc, natoms, cutoff: float, max_neighbors, strict: bool, tie_break: str):
        b = self._built
        t, s, n, structure = b["t"], b["s"], b["n"], b["structure"]
        if not b["periodic"]:
            # no images: a fresh build's one shift is the zero vector, and pos_s + (±0) = pos_s,
            # so these are its squared distances bit for bit (the pair search is what it saves,
            # and the image bookkeeping below, most of a molecule's refine)
            dsq = _squared_distance(pos[t], pos[s], pos.new_zeros(()))
            keep = (dsq <= cutoff * cutoff) & (dsq > MIN_DISTANCE_SQ)
            return _limit_neighbors(t[keep], s[keep], -n[keep], dsq[keep], natoms, pos.shape[0], max_neighbors,
                                    strict, tie_break)
        reps = image_repetitions(pos, cell, pbc, natoms, cutoff, lattice_planes=b["planes"])
        # the grid depends on the cell (fixed until the next build) and the repetitions alone
        grid_key = (pos.dtype, tuple(reps.flatten().tolist()))
        if grid_key not in b["grids"]:
            b["grids"][grid_key] = _image_grid(cell.detach(), reps, pos.dtype)
        grid_reps, _, shift_table, allowed = b["grids"][grid_key]
        # each listed pair's shift, read from the very table a fresh build would use (its cell
        # in the grid of the current repetitions; pairs outside it cannot be within the cutoff)
        in_grid = (n.abs() <= grid_reps).all(dim=-1)
        width = 2 * grid_reps + 1
        shifted = torch.where(in_grid[:, None], n + grid_reps, torch.zeros_like(n))
        cell_index = (shifted[:, 0] * width[1] + shifted[:, 1]) * width[2] + shifted[:, 2]
        dsq = _squared_distance(pos[t], pos[s], shift_table[structure, cell_index])
        keep = (dsq <= cutoff * cutoff) & (dsq > MIN_DISTANCE_SQ) & in_grid & allowed[structure, cell_index]
        return _limit_neighbors(t[keep], s[keep], -n[keep], dsq[keep], natoms, pos.shape[0], max_neighbors, strict,
                                tie_break)

    def cached(self, owner: object, key: Sequence[torch.Tensor], build):
        """``build()``, reused from the previous call for ``owner`` while every tensor of ``key``
        is unchanged and the list was not rebuilt meanwhile (a rebuild may mean a new cell).

        Args:
            owner: whose work it is, hashable (one cached value per owner: the model, or the
                settings the work depends on).
            key: the tensors ``build`` depends on (e.g. the edge sets a model's graph is derived
                from; everything else it reads must be fixed for the structure).
            build: computes the value.
        """
        key = tuple(key)
        entry = self._memo.get(owner)
        if entry is not None:
            generation, old_key, value = entry
            if generation == self._generation and len(old_key) == len(key) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(old_key, key)
            ):
                return value
        value = build()
        self._memo[owner] = (self._generation, key, value)
        return value


# --------------------------------------------------------------------------------------------
# deriving graphs from graphs
# --------------------------------------------------------------------------------------------
_EDGE_ROWS = (K.CELL_OFFSET, DISTANCE, K.EDGE_VECTOR)  # per-edge entries besides EDGE_INDEX


def _num_structures(batch: torch.Tensor, num_structures: int | None) -> int:
    if num_structures is not None:
        return int(num_structures)
    return int(batch.max()) + 1 if batch.numel() else 0


def mask_edges(
    graph: dict, mask: torch.Tensor, batch: torch.Tensor, num_structures: int | None = None
) -> dict:
    """A copy of ``graph`` with only the edges where ``mask`` is True (order kept).

    Per-edge entries (``EDGE_INDEX`` and every tensor whose first dimension is the edge count,
    e.g. ``CELL_OFFSET``, ``DISTANCE``, ``EDGE_VECTOR``) are masked; ``NEIGHBORS`` is recounted;
    ``ID_SWAP`` is dropped (it would be stale). Other entries are copied as they are.
    """
    num_edges = graph[K.EDGE_INDEX].shape[1]
    out = {}
    for key, value in graph.items():
        if key == ID_SWAP:
            continue
        if key == K.EDGE_INDEX:
            out[key] = value[:, mask]
        elif torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == num_edges and key != NEIGHBORS:
            out[key] = value[mask]
        else:
            out[key] = value
    if NEIGHBORS in graph:
        out[NEIGHBORS] = torch.bincount(
            batch[out[K.EDGE_INDEX][1]], minlength=_num_structures(batch, num_structures)
        )
    return out


def select_edges(
    graph: dict,
    batch: torch.Tensor,
    cutoff: float | None = None,
    max_neighbors: int | None = None,
    enforce_max_neighbors_strictly: bool = True,
    num_structures: int | None = None,
    tie_break: str = "reference",
) -> dict:
    """A smaller graph from a bigger one: a tighter cutoff, then a lower neighbour limit.

    As GemNet-OC's ``subselect_edges``: ``distance <= cutoff`` first, then the nearest-neighbour
    limit ranked by *distance* (not squared; the non-strict tie tolerance is 0.01 Å here). The
    input must be sorted by target (any graph from ``radius_graph_pbc``/``build_graph`` is; a
    symmetrized one is not needed for this and should be derived after selection).

    Args:
        graph: dict with ``EDGE_INDEX``, ``DISTANCE`` and any per-edge entries.
        batch: ``[N]`` structure of each atom.
        cutoff: new cutoff, or None to keep.
        max_neighbors: new limit, or None to keep.
        enforce_max_neighbors_strictly: as in ``nearest_neighbor_mask`` (GemNet-OC's default: True).
        num_structures: S (default ``batch.max() + 1``).
        tie_break: see ``nearest_neighbor_mask``.
    """
    if cutoff is not None:
        graph = mask_edges(graph, graph[DISTANCE] <= cutoff, batch, num_structures)
    if max_neighbors is not None:
        mask = nearest_neighbor_mask(
            graph[K.EDGE_INDEX][1], graph[DISTANCE], batch.shape[0], max_neighbors,
            enforce_max_neighbors_strictly, tie_break=tie_break,
        )
        graph = mask_edges(graph, mask, batch, num_structures)
    return graph


def _lex_negative(offset: torch.Tensor) -> torch.Tensor:
    x, y, z = offset[:, 0], offset[:, 1], offset[:, 2]
    return (x < 0) | ((x == 0) & (y < 0)) | ((x == 0) & (y == 0) & (z < 0))


class SymmetricEdges(NamedTuple):
    """Result of ``symmetrize_edges``.

    Attributes:
        edge_index: ``[2, E']`` symmetric edge set.
        cell_offset: ``[E', 3]`` offsets (the counter edge of ``(s, t, o)`` is ``(t, s, -o)``).
        neighbors: ``[S]`` edges per structure.
        source_edge: ``[E']`` index of the input edge each output edge comes from.
        reversed: ``[E']`` bool, True where the output edge is the reverse of its input edge
            (distances carry over, vectors and offsets change sign).
        id_swap: ``[E']`` index of each edge's counter edge.
    """

    edge_index: torch.Tensor
    cell_offset: torch.Tensor
    neighbors: torch.Tensor
    source_edge: torch.Tensor
    reversed: torch.Tensor
    id_swap: torch.Tensor

    def take(self, tensor: torch.Tensor, odd: bool = False) -> torch.Tensor:
        """Carry a per-edge tensor of the input graph over; ``odd`` = changes sign on reversal."""
        out = tensor[self.source_edge]
        if odd:
            sign = 1 - 2 * self.reversed.to(out.dtype if out.is_floating_point() else torch.long)
            out = out * sign.view(-1, *([1] * (out.dim() - 1)))
        return out


def edge_ids(edge_index: torch.Tensor, cell_offset: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """A unique integer per (source, target, offset) triple of one graph (for matching edges)."""
    if cell_offset.shape[0] == 0:
        return edge_index.new_zeros(0)
    low = cell_offset.min()
    base = cell_offset.max() - low + 1
    shifted = cell_offset - low
    cell_id = shifted[:, 0] + base * (shifted[:, 1] + base * shifted[:, 2])
    return edge_index[0] + num_atoms * (edge_index[1] + num_atoms * cell_id)


def counter_edges(edge_index: torch.Tensor, cell_offset: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """``id_swap``: for each edge ``(s, t, o)`` the index of ``(t, s, -o)``; graph must be symmetric."""
    both = torch.cat((cell_offset, -cell_offset))  # shared id space for the edges and their reverses
    ids = edge_ids(torch.cat((edge_index, edge_index.flip(0)), dim=1), both, num_atoms)
    forward, backward = ids[: edge_index.shape[1]], ids[edge_index.shape[1]:]
    order = torch.argsort(forward)
    pos = torch.searchsorted(forward[order], backward)
    pos = pos.clamp(max=max(len(order) - 1, 0))
    if len(order) and not bool((forward[order][pos] == backward).all()):
        raise ValueError("counter_edges: the graph is not symmetric")
    return order[pos]


def symmetrize_edges(
    edge_index: torch.Tensor,
    cell_offset: torch.Tensor,
    batch: torch.Tensor,
    num_structures: int | None = None,
    keep_self_image: str = "negative",
) -> SymmetricEdges:
    """Make a directed (e.g. neighbour-limited) graph symmetric the way GemNet-OC and PaiNN do.

    Keeps one direction of every pair and adds its reverse: edges with ``s < t`` are kept, edges
    with ``s > t`` dropped (an edge whose reverse was cut by the neighbour limit is therefore
    lost, one whose reverse was cut is restored); for an atom's own images (``s == t``) the one
    with a lexicographically negative offset is kept. Output order: per structure, the kept edges
    in input order, then their reverses in the same order (the reference's ``repeat_blocks``).

    Args:
        edge_index: ``[2, E]`` (source, target).
        cell_offset: ``[E, 3]`` kdcache sign.
        batch: ``[N]`` structure of each atom.
        num_structures: S (default ``batch.max() + 1``).
        keep_self_image: ``"negative"`` (GemNet-OC: the rule on its offsets, which are ours) or
            ``"positive"`` (PaiNN: the same rule applied to fairchem's un-negated offsets, i.e.
            positive ones in our sign). The edge *set* is the same either way whenever both
            images of a self pair are present.
    """
    if keep_self_image not in ("negative", "positive"):
        raise ValueError(f"keep_self_image must be 'negative' or 'positive', not {keep_self_image!r}")
    num_atoms = batch.shape[0]
    num_structures = _num_structures(batch, num_structures)
    s, t = edge_index[0], edge_index[1]
    self_side = _lex_negative(cell_offset if keep_self_image == "negative" else -cell_offset)
    keep = (s < t) | ((s == t) & self_side)
    kept = keep.nonzero().view(-1)
    image = batch[t[kept]]
    # Output: for each structure the kept edges then their reverses: stable sort by (image, half).
    halves = torch.cat((image * 2, image * 2 + 1))
    order = torch.argsort(halves, stable=True)
    source_edge = torch.cat((kept, kept))[order]
    rev = torch.cat((torch.zeros_like(kept, dtype=torch.bool), torch.ones_like(kept, dtype=torch.bool)))[order]
    new_index = edge_index[:, source_edge]
    new_index = torch.where(rev[None, :], new_index.flip(0), new_index)
    new_offset = torch.where(rev[:, None], -cell_offset[source_edge], cell_offset[source_edge])
    neighbors = 2 * torch.bincount(image, minlength=num_structures)
    id_swap = counter_edges(new_index, new_offset, num_atoms)
    return SymmetricEdges(new_index, new_offset, neighbors, source_edge, rev, id_swap)


def symmetrize_graph(
    graph: dict,
    batch: torch.Tensor,
    num_structures: int | None = None,
    keep_self_image: str = "negative",
    odd_keys: Sequence[str] = (K.EDGE_VECTOR,),
) -> dict:
    """``symmetrize_edges`` applied to a graph dict: per-edge entries are carried over
    (``odd_keys`` change sign on reversal; ``CELL_OFFSET`` is handled), ``NEIGHBORS`` and
    ``ID_SWAP`` are set."""
    sym = symmetrize_edges(
        graph[K.EDGE_INDEX], graph[K.CELL_OFFSET], batch, num_structures, keep_self_image
    )
    num_edges = graph[K.EDGE_INDEX].shape[1]
    out = {}
    for key, value in graph.items():
        if key in (K.EDGE_INDEX, K.CELL_OFFSET, NEIGHBORS, ID_SWAP):
            continue
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == num_edges:
            out[key] = sym.take(value, odd=key in odd_keys)
        else:
            out[key] = value
    out[K.EDGE_INDEX] = sym.edge_index
    out[K.CELL_OFFSET] = sym.cell_offset
    out[NEIGHBORS] = sym.neighbors
    out[ID_SWAP] = sym.id_swap
    return out


# --------------------------------------------------------------------------------------------
# convenience for a PyG batch
# --------------------------------------------------------------------------------------------
class Structures(NamedTuple):
    """The per-structure tensors a graph needs, on the device (cell: in the dtype) of ``pos``.

    Attributes:
        cell: ``[S, 3, 3]`` lattice vectors as rows (zeros for a molecule).
        pbc: ``[S, 3]`` bool, periodic directions.
        natoms: ``[S]`` long, atoms per structure.
        batch: ``[N]`` long, structure of each atom.
    """

    cell: torch.Tensor
    pbc: torch.Tensor
    natoms: torch.Tensor
    batch: torch.Tensor


def _field(data, key: str):
    """``data[key]``, or None when the batch lacks the field (or holds None)."""
    return data[key] if key in data and data[key] is not None else None


def batch_structures(data, pos: torch.Tensor, use_pbc: bool = True) -> Structures:
    """Cell, periodicity, atom counts and structure index of a PyG ``Data``/``Batch``.

    The one place that decides what a batch without some field means, for :func:`build_graph`
    and for every model (:class:`kdcache.models.base.PotentialModel`).

    Args:
        data: one structure or a batch (keys ``natoms`` and optionally ``cell``, ``pbc``, ``batch``).
        pos: ``[N, 3]`` positions the graph will be built from (sets device and dtype).
        use_pbc: False treats every structure as a molecule whatever its ``pbc`` says.

    Returns:
        :class:`Structures`. Without ``cell``: zeros. Without ``pbc``: periodic along every
        direction with a non-zero lattice vector. Without ``batch``: atoms in ``natoms`` order.
    """
    natoms = torch.as_tensor(data[K.NATOMS], device=pos.device).view(-1)
    num_structures = natoms.shape[0]
    cell = _field(data, K.CELL)
    cell = pos.new_zeros(num_structures, 3, 3) if cell is None else cell.reshape(num_structures, 3, 3).to(pos)
    pbc = _field(data, K.PBC)
    if pbc is None:
        pbc = cell.detach().abs().sum(dim=-1) > 0  # zeros mean a molecule
    pbc = torch.as_tensor(pbc, device=pos.device).bool().reshape(num_structures, 3)
    if not use_pbc:
        pbc = torch.zeros_like(pbc)
    batch = _field(data, K.BATCH)
    if batch is None:
        batch = torch.repeat_interleave(torch.arange(num_structures, device=pos.device), natoms)
    return Structures(cell, pbc, natoms, batch.to(pos.device))


def build_graph(
    data,
    cutoff: float,
    max_neighbors: int | None,
    symmetric: bool = False,
    enforce_max_neighbors_strictly: bool = True,
    keep_self_image: str = "negative",
    tie_break: str = "reference",
) -> dict:
    """The graph of a PyG ``Data``/``Batch`` (keys ``pos, cell, pbc, natoms`` [, ``batch``]).

    Args:
        data: one structure or a batch.
        cutoff: radius in Å.
        max_neighbors: neighbour limit (nearest first, squared-distance ranking).
        symmetric: make it symmetric afterwards (``symmetrize_graph``), which also sets ``ID_SWAP``.
        enforce_max_neighbors_strictly: default True, as the models' ``generate_graph``.
        keep_self_image: see ``symmetrize_edges``.
        tie_break: see ``nearest_neighbor_mask``.

    Returns:
        dict with ``EDGE_INDEX``, ``CELL_OFFSET``, ``DISTANCE``, ``EDGE_VECTOR`` (differentiable
        w.r.t. ``data.pos``), ``NEIGHBORS`` [S] and, if symmetric, ``ID_SWAP``.
    """
    pos = data[K.POSITIONS]
    cell, pbc, natoms, batch = batch_structures(data, pos)
    num_structures = natoms.shape[0]
    try:
        edge_index, cell_offset, neighbors = radius_graph_pbc(
            pos, cell, pbc, natoms, cutoff, max_neighbors, enforce_max_neighbors_strictly,
            tie_break=tie_break,
        )
    except DataError as err:
        # Name the sample by its global dataset index when the batch carries it.
        sample_index = getattr(data, K.SAMPLE_INDEX, None)
        if err.index is None or sample_index is None:
            raise
        index = int(torch.as_tensor(sample_index).view(-1)[err.index])
        raise DataError(err.path, index, err.field, err.message) from err
    distance, edge_vector = edge_geometry(pos, cell, batch, edge_index, cell_offset)
    graph = {
        K.EDGE_INDEX: edge_index,
        K.CELL_OFFSET: cell_offset,
        DISTANCE: distance,
        K.EDGE_VECTOR: edge_vector,
        NEIGHBORS: neighbors,
    }
    if symmetric:
        graph = symmetrize_graph(graph, batch, num_structures, keep_self_image)
    return graph
