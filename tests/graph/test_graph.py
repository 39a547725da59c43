"""The radius graph against brute force, ASE, and the reference GemNet-OC main graph."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache import graph as G
from kdcache import keys as K
from kdcache.errors import DataError

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "gemnet_oc" / "reference.npz"


# --------------------------------------------------------------------------------------------
# helpers: an independent brute force (numpy, explicit image loops, generous image range)
# --------------------------------------------------------------------------------------------
def brute_force(positions, cell, pbc, cutoff):
    """All (s, t, offset) -> distance with vec = pos[t] - pos[s] + offset @ cell, 0.01 < d <= cutoff."""
    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    reps = []
    for k in range(3):
        if not pbc[k]:
            reps.append(0)
            continue
        # generous: cutoff / (shortest plane spacing of the periodic sublattice) + full spread + 1
        periodic = cell[np.asarray(pbc)]
        dual = np.linalg.solve(periodic @ periodic.T, periodic)
        row = np.flatnonzero(pbc).tolist().index(k)
        spacing = 1.0 / np.linalg.norm(dual[row])
        frac = positions @ dual[row]
        reps.append(int(np.ceil(cutoff / spacing + np.ptp(frac))) + 1)
    edges = {}
    for n in itertools.product(*[range(-r, r + 1) for r in reps]):
        shift = np.asarray(n, dtype=np.float64) @ cell
        vec = positions[None, :, :] - positions[:, None, :] + shift  # [s, t, 3]
        dist = np.linalg.norm(vec, axis=-1)
        for s, t in zip(*np.nonzero((dist <= cutoff) & (dist > 0.01))):
            edges[(int(s), int(t), tuple(int(x) for x in n))] = float(dist[s, t])
    return edges


def edge_dict(edge_index, cell_offset, atom_start=0):
    return {
        (int(s) - atom_start, int(t) - atom_start, tuple(int(x) for x in o))
        for s, t, o in zip(edge_index[0].tolist(), edge_index[1].tolist(), cell_offset.tolist())
    }


def random_structure(rng, natoms, lengths, pbc=(True, True, True), skew=0.3):
    cell = np.diag(lengths) + skew * rng.uniform(-1, 1, (3, 3)) * np.asarray(lengths)[:, None]
    frac = rng.uniform(0, 1, (natoms, 3))
    positions = frac @ cell
    return positions, cell, np.asarray(pbc, dtype=bool)


def as_batch(structures, dtype=torch.float64):
    pos = torch.tensor(np.concatenate([s[0] for s in structures]), dtype=dtype)
    cell = torch.tensor(np.stack([s[1] for s in structures]), dtype=dtype)
    pbc = torch.tensor(np.stack([s[2] for s in structures]))
    natoms = torch.tensor([len(s[0]) for s in structures])
    return pos, cell, pbc, natoms


def split_edges(edge_index, cell_offset, natoms):
    """Per structure: the set of (s, t, o) with atom indices local to the structure."""
    starts = np.concatenate([[0], np.cumsum(natoms.tolist())])
    out = []
    for k in range(len(natoms)):
        mask = (edge_index[1] >= starts[k]) & (edge_index[1] < starts[k + 1])
        out.append(edge_dict(edge_index[:, mask], cell_offset[mask], int(starts[k])))
    return out


# --------------------------------------------------------------------------------------------
# the full radius graph
# --------------------------------------------------------------------------------------------
def mixed_batch(seed):
    rng = np.random.default_rng(seed)
    return [
        random_structure(rng, 7, [6.0, 7.0, 8.0]),
        random_structure(rng, 3, [2.1, 2.6, 3.1], skew=0.4),  # cell << cutoff: many self images
        random_structure(rng, 5, [4.0, 4.5, 12.0], pbc=(True, True, False)),  # slab
        random_structure(rng, 4, [3.0, 9.0, 9.0], pbc=(True, False, False)),  # wire
        (rng.uniform(-3, 3, (6, 3)), np.zeros((3, 3)), np.zeros(3, dtype=bool)),  # molecule
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_graph_equals_brute_force(seed):
    structures = mixed_batch(seed)
    cutoff = 5.0
    pos, cell, pbc, natoms = as_batch(structures)
    edge_index, cell_offset, neighbors = G.radius_graph_pbc(pos, cell, pbc, natoms, cutoff, None)
    got = split_edges(edge_index, cell_offset, natoms)
    for k, (positions, c, p) in enumerate(structures):
        expected = brute_force(positions, c, p, cutoff)
        assert got[k] == set(expected), f"structure {k}"
        assert neighbors[k] == len(expected)
    assert len(got[1]) > 0 and any(s == t for s, t, _ in got[1])  # self images are present
    assert all(o == (0, 0, 0) for _, _, o in got[4])  # molecule: no images
    assert all(o[2] == 0 for _, _, o in got[2]) and all(o[1:] == (0, 0) for _, _, o in got[3])
    assert bool((edge_index[1][1:] >= edge_index[1][:-1]).all())  # sorted by target
    # edge vectors follow the convention pos[t] - pos[s] + o @ cell
    batch = torch.repeat_interleave(torch.arange(len(natoms)), natoms)
    distance, vector = G.edge_geometry(pos, cell, batch, edge_index, cell_offset)
    s, t = edge_index
    manual = pos[t] - pos[s] + (cell_offset.double()[:, :, None] * cell[batch[t]]).sum(1)
    torch.testing.assert_close(vector * distance[:, None], manual)
    assert float(distance.max()) <= cutoff and float(distance.min()) > 0.01


def test_matches_ase_neighbor_list():
    from ase.neighborlist import primitive_neighbor_list

    rng = np.random.default_rng(7)
    structures = [random_structure(rng, 4, [2.5, 3.0, 3.5]), random_structure(rng, 9, [7.0, 6.0, 9.0])]
    pos, cell, pbc, natoms = as_batch(structures)
    edge_index, cell_offset, _ = G.radius_graph_pbc(pos, cell, pbc, natoms, 4.5, None)
    got = split_edges(edge_index, cell_offset, natoms)
    for k, (positions, c, p) in enumerate(structures):
        i, j, shift = primitive_neighbor_list("ijS", p, c, positions, 4.5, self_interaction=False)
        # ase: vec = pos[j] - pos[i] + S @ cell  ->  source i, target j, offset S
        assert got[k] == {(int(a), int(b), tuple(int(x) for x in S)) for a, b, S in zip(i, j, shift)}


def test_unwrapped_positions_are_complete():
    rng = np.random.default_rng(3)
    positions, cell, pbc = random_structure(rng, 6, [3.0, 3.5, 4.0])
    positions = positions + np.array([2, -3, 1]) @ cell + rng.uniform(-5, 5, (6, 3))  # far outside
    pos, c, p, natoms = as_batch([(positions, cell, pbc)])
    edge_index, cell_offset, _ = G.radius_graph_pbc(pos, c, p, natoms, 5.0, None)
    assert edge_dict(edge_index, cell_offset) == set(brute_force(positions, cell, pbc, 5.0))


def test_zero_vector_along_non_periodic_direction():
    rng = np.random.default_rng(4)
    positions, cell, _ = random_structure(rng, 5, [3.0, 4.0, 5.0])
    cell[2] = 0.0  # 2D periodic with no third lattice vector at all
    pbc = np.array([True, True, False])
    pos, c, p, natoms = as_batch([(positions, cell, pbc)])
    edge_index, cell_offset, _ = G.radius_graph_pbc(pos, c, p, natoms, 5.0, None)
    assert edge_dict(edge_index, cell_offset) == set(brute_force(positions, cell, pbc, 5.0))


def test_same_edges_in_float32_and_small_chunks():
    structures = mixed_batch(5)
    pos, cell, pbc, natoms = as_batch(structures)
    ref = G.radius_graph_pbc(pos, cell, pbc, natoms, 4.0, None)
    small = G.radius_graph_pbc(pos, cell, pbc, natoms, 4.0, None, chunk_size=97)
    for a, b in zip(ref, small):
        assert torch.equal(a, b)
    pos32, cell32, _, _ = as_batch(structures, torch.float32)
    single = G.radius_graph_pbc(pos32, cell32, pbc, natoms, 4.0, None)
    assert edge_dict(*single[:2]) == edge_dict(*ref[:2])
    batch = torch.repeat_interleave(torch.arange(len(natoms)), natoms)
    d32, v32 = G.edge_geometry(pos32, cell32, batch, *single[:2])
    assert d32.dtype == torch.float32 and v32.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# neighbour limit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strict", [True, False])
def test_neighbor_limit_nearest_first(strict):
    rng = np.random.default_rng(11)
    structures = [random_structure(rng, 8, [4.0, 5.0, 5.5]), random_structure(rng, 3, [2.3, 2.8, 3.3])]
    pos, cell, pbc, natoms = as_batch(structures)
    cutoff, limit = 5.0, 12
    edge_index, cell_offset, neighbors = G.radius_graph_pbc(
        pos, cell, pbc, natoms, cutoff, limit, enforce_max_neighbors_strictly=strict
    )
    got = split_edges(edge_index, cell_offset, natoms)
    for k, (positions, c, p) in enumerate(structures):
        full = brute_force(positions, c, p, cutoff)
        for t in range(len(positions)):
            into_t = sorted(d for (s, tt, o), d in full.items() if tt == t)
            kept = sorted(full[e] for e in got[k] if e[1] == t)
            assert len(into_t) > limit  # the limit is exercised
            if strict:
                np.testing.assert_allclose(kept, into_t[:limit], rtol=0, atol=1e-12)
            else:  # everything within 0.01 Å² of the (limit+1)-th nearest, by squared distance
                bound = into_t[limit] ** 2 + G.DEGENERACY_TOLERANCE
                np.testing.assert_allclose(kept, [d for d in into_t if d * d <= bound], atol=1e-12)
                assert len(kept) >= limit
        assert neighbors[k] == len(got[k])


def test_non_strict_keeps_degenerate_shell_and_strict_cuts_it():
    # simple cubic crystal, one atom: 6 nearest images at exactly a, 12 at a*sqrt(2)
    positions, cell, pbc = np.zeros((1, 3)), 3.0 * np.eye(3), np.ones(3, dtype=bool)
    pos, c, p, natoms = as_batch([(positions, cell, pbc)])
    loose = G.radius_graph_pbc(pos, c, p, natoms, 4.5, 8, enforce_max_neighbors_strictly=False)
    strict = G.radius_graph_pbc(pos, c, p, natoms, 4.5, 8, enforce_max_neighbors_strictly=True)
    assert loose[0].shape[1] == 18 and strict[0].shape[1] == 8
    stable = G.radius_graph_pbc(pos, c, p, natoms, 4.5, 8, True, tie_break="stable")
    # "stable": the 6 nearest, then the first 2 of the 12-shell in candidate order
    offsets = [tuple(o) for o in stable[1].tolist()]
    assert sum(np.isclose(np.linalg.norm(o), 1.0) for o in offsets) == 6
    second_shell = {o for o in offsets if np.isclose(np.linalg.norm(o), np.sqrt(2))}
    assert second_shell == {(1, 1, 0), (1, 0, 1)}  # candidates come by n = -o ascending


def test_tie_break_reference_vs_stable_same_without_ties():
    rng = np.random.default_rng(2)
    pos, cell, pbc, natoms = as_batch([random_structure(rng, 10, [5.0, 5.0, 5.0])])
    a = G.radius_graph_pbc(pos, cell, pbc, natoms, 5.0, 9, True, tie_break="reference")
    b = G.radius_graph_pbc(pos, cell, pbc, natoms, 5.0, 9, True, tie_break="stable")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------
# derived graphs
# --------------------------------------------------------------------------------------------
def graph_of(pos, cell, pbc, natoms, cutoff, limit=None, strict=True):
    from torch_geometric.data import Batch, Data

    data = []
    start = 0
    for k, n in enumerate(natoms.tolist()):
        data.append(Data(pos=pos[start:start + n], cell=cell[k:k + 1], pbc=pbc[k:k + 1],
                         natoms=torch.tensor([n])))
        start += n
    batch = Batch.from_data_list(data)
    return batch, G.build_graph(batch, cutoff, limit, enforce_max_neighbors_strictly=strict)


def test_select_edges_equals_direct_graph():
    structures = mixed_batch(8)
    pos, cell, pbc, natoms = as_batch(structures)
    batch, big = graph_of(pos, cell, pbc, natoms, 5.0, None)
    small = G.select_edges(big, batch.batch, cutoff=3.5)
    direct = G.radius_graph_pbc(pos, cell, pbc, natoms, 3.5, None)
    assert torch.equal(small[K.EDGE_INDEX], direct[0]) and torch.equal(small[K.CELL_OFFSET], direct[1])
    assert torch.equal(small[G.NEIGHBORS], direct[2])
    limited = G.select_edges(big, batch.batch, max_neighbors=6)
    direct = G.radius_graph_pbc(pos, cell, pbc, natoms, 5.0, 6, True)
    assert edge_dict(limited[K.EDGE_INDEX], limited[K.CELL_OFFSET]) == edge_dict(*direct[:2])
    assert torch.equal(limited[G.NEIGHBORS], direct[2])


def test_symmetrize_edges():
    structures = mixed_batch(9)
    pos, cell, pbc, natoms = as_batch(structures)
    batch, graph = graph_of(pos, cell, pbc, natoms, 5.0, 7)
    directed = edge_dict(graph[K.EDGE_INDEX], graph[K.CELL_OFFSET])
    sym = G.symmetrize_graph(graph, batch.batch)
    ei, off = sym[K.EDGE_INDEX], sym[K.CELL_OFFSET]
    got = edge_dict(ei, off)
    assert len(got) == ei.shape[1]  # no duplicates

    def lex_negative(o):
        return o < (0, 0, 0)

    kept = {e for e in directed if e[0] < e[1] or (e[0] == e[1] and lex_negative(e[2]))}
    expected = kept | {(t, s, tuple(-x for x in o)) for s, t, o in kept}
    assert got == expected
    assert got != directed  # the limit made the input asymmetric, so this did something
    # counter edges, carried tensors
    swap = sym[G.ID_SWAP]
    assert torch.equal(ei[:, swap], ei.flip(0)) and torch.equal(off[swap], -off)
    torch.testing.assert_close(sym[K.EDGE_VECTOR][swap], -sym[K.EDGE_VECTOR])
    torch.testing.assert_close(sym[G.DISTANCE][swap], sym[G.DISTANCE])
    d, v = G.edge_geometry(pos, cell, batch.batch, ei, off)
    torch.testing.assert_close(d, sym[G.DISTANCE])
    torch.testing.assert_close(v, sym[K.EDGE_VECTOR])
    assert sym[G.NEIGHBORS].tolist() == [len(s) for s in split_edges(ei, off, natoms)]
    # the PaiNN variant keeps the other image of each self pair (s == t)
    other = G.symmetrize_graph(graph, batch.batch, keep_self_image="positive")
    kept_other = {e for e in directed if e[0] < e[1] or (e[0] == e[1] and (0, 0, 0) < e[2])}
    expected_other = kept_other | {(t, s, tuple(-x for x in o)) for s, t, o in kept_other}
    assert edge_dict(other[K.EDGE_INDEX], other[K.CELL_OFFSET]) == expected_other
    assert expected_other != expected  # the strict limit cut some self pairs in half here


# --------------------------------------------------------------------------------------------
# gradients, errors, the reference
# --------------------------------------------------------------------------------------------
def test_gradients_flow_to_positions():
    rng = np.random.default_rng(12)
    structures = [random_structure(rng, 4, [3.0, 3.2, 3.4]), (rng.uniform(-2, 2, (3, 3)), np.zeros((3, 3)), np.zeros(3, bool))]
    pos, cell, pbc, natoms = as_batch(structures)
    batch = torch.repeat_interleave(torch.arange(2), natoms)
    edge_index, cell_offset, _ = G.radius_graph_pbc(pos, cell, pbc, natoms, 4.0, None)

    def energy(p):
        d, v = G.edge_geometry(p, cell, batch, edge_index, cell_offset)
        return (torch.exp(-d) + v[:, 0] ** 3).sum()

    pos = pos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(energy, (pos,))
    (grad,) = torch.autograd.grad(energy(pos), pos)
    assert float(grad.abs().sum()) > 0


def test_bad_input_raises_data_error():
    pos = torch.zeros(2, 3, dtype=torch.float64)
    pos[1, 0] = 1.0
    cell = torch.zeros(1, 3, 3, dtype=torch.float64)
    with pytest.raises(DataError, match="cell"):
        G.radius_graph_pbc(pos, cell, torch.ones(1, 3, dtype=torch.bool), torch.tensor([2]), 3.0, None)
    with pytest.raises(DataError, match="natoms"):
        G.radius_graph_pbc(pos, cell, torch.zeros(1, 3, dtype=torch.bool), torch.tensor([3]), 3.0, None)


def test_empty_and_isolated():
    pos = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], dtype=torch.float64)
    out = G.radius_graph_pbc(pos, torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool), torch.tensor([2]), 3.0, 5)
    assert out[0].shape == (2, 0) and out[1].shape == (0, 3) and out[2].tolist() == [0]
    # empty structures anywhere in a batch, a lone molecule atom, a periodic atom seeing itself
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    cell = torch.stack([torch.eye(3) * 2.5, torch.zeros(3, 3), torch.eye(3) * 3.0]).double()
    pbc = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 1]]).bool()
    counts = {(2, 0, 1): [8, 0, 4], (0, 3, 0): [0, 6, 0], (2, 1, 0): [8, 0, 0]}
    for natoms, expected in counts.items():
        _, _, neighbors = G.radius_graph_pbc(pos, cell, pbc, torch.tensor(natoms), 3.1, 4, True)
        assert neighbors.tolist() == expected, natoms


def test_derived_graphs_of_edgeless_structures():
    """select / mask / symmetrize on graphs with no edge at all, or none in some structures
    (lone atoms and out-of-cutoff pairs batched with a molecule), as the models derive them."""
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, 6.0, -4.5],
                        [0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], dtype=torch.float64)
    cell, pbc = torch.zeros(3, 3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.bool)
    # per structure: edges of the graph (cutoff 6), of a sub-graph (cutoff 3, nearest 1), and of
    # that made symmetric (the O's nearest is one H, each H's the O: two pairs, four edges)
    cases = {(1, 2): ([0, 0], [0, 0], [0, 0]), (1, 2, 3): ([0, 0, 6], [0, 0, 3], [0, 0, 4])}
    for natoms, (full, selected, symmetric) in cases.items():
        n, s = sum(natoms), len(natoms)
        batch, graph = graph_of(pos[:n], cell[:s], pbc[:s], torch.tensor(natoms), 6.0, 30)
        assert graph[G.NEIGHBORS].tolist() == full
        sub = G.select_edges(graph, batch.batch, cutoff=3.0, max_neighbors=1, num_structures=s)
        assert sub[G.NEIGHBORS].tolist() == selected and sub[G.DISTANCE].shape == (selected[-1],)
        sym = G.symmetrize_graph(sub, batch.batch, s)
        ei, swap = sym[K.EDGE_INDEX], sym[G.ID_SWAP]
        assert sym[G.NEIGHBORS].tolist() == symmetric and sym[K.EDGE_VECTOR].shape == (symmetric[-1], 3)
        assert swap.dtype == torch.long and torch.equal(ei[:, swap], ei.flip(0))
        assert bool((ei >= 3).all())  # only the molecule's atoms have edges


def test_reference_gemnet_oc_main_graph():
    """cutoff 6, a2a graph (limit 1000, strict) -> 30 nearest (strict, by distance) -> symmetric."""
    ref = np.load(REFERENCE)
    pos = torch.tensor(ref["pos"])
    cell = torch.tensor(ref["cell"])
    natoms = torch.tensor(ref["natoms"])
    batch = torch.repeat_interleave(torch.arange(len(natoms)), natoms)
    edge_index, cell_offset, neighbors = G.radius_graph_pbc(
        pos, cell, torch.ones(len(natoms), 3, dtype=torch.bool), natoms, 6.0, 1000, True
    )
    distance, vector = G.edge_geometry(pos, cell, batch, edge_index, cell_offset)
    graph = {K.EDGE_INDEX: edge_index, K.CELL_OFFSET: cell_offset, G.DISTANCE: distance,
             K.EDGE_VECTOR: vector, G.NEIGHBORS: neighbors}
    main = G.symmetrize_graph(G.select_edges(graph, batch, max_neighbors=30), batch)
    ref_index = torch.tensor(ref["edge_index"])
    ref_offset = torch.tensor(ref["cell_offset"]).long()
    assert edge_dict(main[K.EDGE_INDEX], main[K.CELL_OFFSET]) == edge_dict(ref_index, ref_offset)
    # same order too (summation order of the model then matches the reference's)
    assert torch.equal(main[K.EDGE_INDEX], ref_index) and torch.equal(main[K.CELL_OFFSET], ref_offset)
    torch.testing.assert_close(main[K.EDGE_VECTOR], torch.tensor(ref["edge_vector"]), rtol=0, atol=1e-12)
    # a cell smaller than the cutoff with a strict cut through the shell of self images is in
    # here: the plain stable tie-break would lose some self-image pairs
    stable = G.symmetrize_graph(G.select_edges(graph, batch, max_neighbors=30, tie_break="stable"), batch)
    assert edge_dict(stable[K.EDGE_INDEX], stable[K.CELL_OFFSET]) != edge_dict(ref_index, ref_offset)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    structures = mixed_batch(4)
    pos, cell, pbc, natoms = as_batch(structures)
    cpu = G.radius_graph_pbc(pos, cell, pbc, natoms, 5.0, 8, False)
    gpu = G.radius_graph_pbc(pos.cuda(), cell.cuda(), pbc.cuda(), natoms.cuda(), 5.0, 8, False)
    assert edge_dict(*cpu[:2]) == edge_dict(gpu[0].cpu(), gpu[1].cpu())


def test_reference_tie_break_literal():
    """fcc Cu primitive cell, 15 nearest of 54 (12 at 2.55 Å, then 3 of the 6 at 3.6 Å).

    The expected offsets were produced by fairchem 1.10's ``radius_graph_pbc`` (strict; offsets
    negated to our sign) in float64 on CPU: which 3 of the 6 tied images it keeps follows torch's
    unstable row sort, which ``tie_break="reference"`` reproduces and "stable" does not.
    """
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.6)
    pos = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell.array)[None]
    args = (pos, cell, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]), 5.2, 15, True)
    expected = {
        (-1, 0, 0), (-1, 0, 1), (-1, 1, -1), (-1, 1, 0), (-1, 1, 1), (0, -1, 0), (0, -1, 1),
        (0, 0, -1), (0, 0, 1), (0, 1, -1), (0, 1, 0), (1, -1, 0), (1, -1, 1), (1, 0, -1), (1, 0, 0),
    }
    _, offset, _ = G.radius_graph_pbc(*args)
    assert {tuple(o) for o in offset.tolist()} == expected
    _, offset, _ = G.radius_graph_pbc(*args, tie_break="stable")
    assert {tuple(o) for o in offset.tolist()} != expected and offset.shape[0] == 15


def test_non_finite_positions_name_the_sample():
    from torch_geometric.data import Batch, Data

    good = Data(pos=torch.rand(3, 3, dtype=torch.float64) * 3, cell=torch.eye(3)[None] * 4,
                pbc=torch.ones(1, 3, dtype=torch.bool), natoms=torch.tensor([3]), sample_index=torch.tensor([40]))
    bad = good.clone()
    bad.pos = bad.pos.clone()
    bad.pos[1, 2] = float("nan")
    bad.sample_index = torch.tensor([41])
    batch = Batch.from_data_list([good, bad])
    # set after batching: plain PyG increments keys containing "index" by the atom count
    batch.sample_index = torch.tensor([40, 41])
    with pytest.raises(DataError, match="sample 41.*'pos'"):
        G.build_graph(batch, 3.0, 10)
    graph = G.build_graph(Batch.from_data_list([good]), 3.0, 10, symmetric=True)
    assert set(graph) == {K.EDGE_INDEX, K.CELL_OFFSET, G.DISTANCE, K.EDGE_VECTOR, G.NEIGHBORS, G.ID_SWAP}
