"""GemNet-OC: parity with the reference implementation (fairchem-core 1.10, float64), symmetry
(rotation, translation, permutation), gradient forces vs finite differences, OCP parameter
names/order, and the OC20 preset's size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from kdcache import keys as K
from kdcache.models.gemnet_oc import GemNetOC
from kdcache.models.gemnet_oc.bases import legendre_harmonics, real_spherical_harmonics
from kdcache.models.gemnet_oc.indices import get_quadruplets, get_triplets, inner_index, ragged_arange
from kdcache.models.radial import PolynomialEnvelope

REF = Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "gemnet_oc"
ALL_FEATURES = (K.NODE, K.EDGE, K.E2N, K.E2V)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def load_ocp(path: Path, dtype=torch.float64) -> GemNetOC:
    """Minimal OCP loader: strip ``module.``, load, then the EMA shadow weights (reference order:
    ``model.parameters()`` with ``requires_grad``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = GemNetOC(**ckpt["config"]["model_attributes"]).to(dtype)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(k.startswith("normalizer.") for k in missing), (missing, unexpected)
    params = [p for p in model.parameters() if p.requires_grad]
    shadow = ckpt["ema"]["shadow_params"]
    assert len(params) == len(shadow)
    with torch.no_grad():
        for p, s in zip(params, shadow):
            assert p.shape == s.shape
            p.copy_(s)
    return model.eval()


def make_batch(ref, pos=None, cell=None, order=None, structures=None) -> Batch:
    """Reference structures as a batch; optional replaced positions/cells and per-atom order."""
    pos = ref["pos"] if pos is None else pos
    cell = ref["cell"] if cell is None else cell
    items, start = [], 0
    for s, n in enumerate(ref["natoms"]):
        idx = np.arange(start, start + int(n))
        start += int(n)
        if structures is not None and s not in structures:
            continue
        if order is not None:
            idx = order[idx]
        items.append(
            Data(
                pos=torch.as_tensor(pos[idx]),
                atomic_numbers=torch.as_tensor(ref["atomic_numbers"][idx]),
                cell=torch.as_tensor(cell[s]).view(1, 3, 3),
                pbc=torch.ones(1, 3, dtype=torch.bool),
                natoms=torch.tensor([int(n)]),
                tags=torch.as_tensor(ref["tags"][idx]),
                fixed=torch.as_tensor(ref["fixed"][idx]).bool(),
            )
        )
    return Batch.from_data_list(items)


def rel(a, b) -> float:
    a = a.detach().numpy() if torch.is_tensor(a) else a
    b = b.detach().numpy() if torch.is_tensor(b) else b
    return float(np.abs(a - b).max() / np.abs(b).max())


def edge_keys(edge_index, cell_offset) -> list[tuple]:
    ei = np.asarray(edge_index).astype(np.int64)
    off = np.rint(np.asarray(cell_offset)).astype(np.int64)
    return [(int(s), int(t), *map(int, o)) for s, t, o in zip(ei[0], ei[1], off)]


def random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: one thread is faster than two fighting over a shared CPU (~3x less CPU time)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF / "reference.npz"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_ocp(REF / "checkpoint.pt")


@pytest.fixture(scope="module")
def base(ref, model):
    with torch.no_grad():
        return model(make_batch(ref), features=ALL_FEATURES)


# ----------------------------------------------------------------------------------------------
# checkpoint layout
# ----------------------------------------------------------------------------------------------
def test_state_dict_keys_and_ema_order_match_checkpoint():
    ckpt = torch.load(REF / "checkpoint.pt", map_location="cpu", weights_only=True)
    with torch.device("meta"):  # names and shapes only
        model = GemNetOC(**ckpt["config"]["model_attributes"])
    ours = [k for k in model.state_dict() if not k.startswith("normalizer.")]
    theirs = [k.removeprefix("module.") for k in ckpt["state_dict"]]
    assert ours == theirs  # same names in the same order
    # scale factors are non-trainable parameters named exactly like the checkpoint's
    scales = [n for n, p in model.named_parameters() if n.endswith("scale_factor")]
    assert scales and all(not dict(model.named_parameters())[n].requires_grad for n in scales)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [tuple(s.shape) for s in ckpt["ema"]["shadow_params"]]
    assert model.config["emb_size_edge"] == 48 and model.name == "gemnet_oc"


def test_general_checkpoint_loader_reproduces_energies(ref):
    from kdcache.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(REF / "checkpoint.pt", dtype=torch.float64)
    assert isinstance(loaded.model, GemNetOC) and loaded.used_ema
    with torch.no_grad():
        out = loaded.model(make_batch(ref, structures=(0,)))
    assert rel(out[K.ENERGY], ref["energy"][:1]) < 1e-8


# ----------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------
def test_parity_with_reference(ref, base):
    for key in (K.ENERGY, K.FORCES, K.ATOM_ENERGY, K.NODE, K.E2N, K.E2V):
        assert base[key].shape == ref[key].shape, key
        assert rel(base[key], ref[key]) < 1e-8, key
    # the main graph is the reference's, edge for edge; features match per (s, t, offset)
    ours = edge_keys(base[K.EDGE_INDEX], base[K.CELL_OFFSET])
    theirs = edge_keys(ref["edge_index"], ref["cell_offset"])
    assert len(set(ours)) == len(ours) and set(ours) == set(theirs)
    where = {k: i for i, k in enumerate(ours)}
    perm = torch.tensor([where[k] for k in theirs])
    assert rel(base[K.EDGE][perm], ref["edge"]) < 1e-8
    assert rel(base[K.EDGE_VECTOR][perm], ref["edge_vector"]) < 1e-12
    # energy is the sum of the per-atom energies
    batch = torch.repeat_interleave(torch.arange(3), torch.as_tensor(ref["natoms"]))
    summed = torch.zeros(3, dtype=torch.float64).index_add_(0, batch, base[K.ATOM_ENERGY])
    assert rel(summed, base[K.ENERGY]) < 1e-12


def test_features_only_when_asked(ref, model):
    with torch.no_grad():
        out = model(make_batch(ref, structures=(0,)))
        only = model(make_batch(ref, structures=(0,)), features=(K.E2V,))
    assert set(out) == {K.ENERGY, K.FORCES, K.ATOM_ENERGY}
    assert set(only) == {K.ENERGY, K.FORCES, K.ATOM_ENERGY, K.E2V}
    with pytest.raises(ValueError, match="vector"):
        model(make_batch(ref, structures=(0,)), features=(K.VECTOR,))


# ----------------------------------------------------------------------------------------------
# symmetry
# ----------------------------------------------------------------------------------------------
def test_rotation_invariance_and_equivariance(ref, model, base):
    rot = random_rotation(7)
    with torch.no_grad():
        out = model(make_batch(ref, pos=ref["pos"] @ rot.T, cell=ref["cell"] @ rot.T), features=ALL_FEATURES)
    R = torch.as_tensor(rot)
    assert rel(out[K.ENERGY], base[K.ENERGY]) < 1e-5
    assert rel(out[K.NODE], base[K.NODE]) < 1e-5
    assert rel(out[K.E2N], base[K.E2N]) < 1e-5
    assert rel(out[K.FORCES], base[K.FORCES] @ R.T) < 1e-5
    assert rel(out[K.E2V], torch.einsum("ij,njd->nid", R, base[K.E2V])) < 1e-5
    # and the rotation does change the raw vectors (the test is not vacuous)
    assert rel(out[K.FORCES], base[K.FORCES]) > 1e-2


def test_translation_invariance(ref, model, base):
    shift = np.array([0.37, -1.21, 2.05])
    with torch.no_grad():
        out = model(make_batch(ref, pos=ref["pos"] + shift), features=(K.NODE, K.E2V))
    assert rel(out[K.ENERGY], base[K.ENERGY]) < 1e-8
    assert rel(out[K.FORCES], base[K.FORCES]) < 1e-8
    assert rel(out[K.E2V], base[K.E2V]) < 1e-8


def test_permutation_consistency(ref, model):
    # Exactly consistent only without neighbour truncation: like the reference, the symmetric
    # main graph keeps a truncated one-way pair only if its kept direction has s < t, so with
    # active limits the edge set depends on the atom order. Same weights, limits above the counts.
    attrs = {**model.config}
    attrs.update({k: 4.0 for k in ("cutoff", "cutoff_qint", "cutoff_aeaint", "cutoff_aint")})
    attrs.update({k: 1000 for k in ("max_neighbors", "max_neighbors_qint", "max_neighbors_aeaint", "max_neighbors_aint")})
    with torch.device("meta"):
        untruncated = GemNetOC(**attrs)
    untruncated.load_state_dict(model.state_dict(), assign=True)
    untruncated.eval()
    rng = np.random.default_rng(3)
    order = np.concatenate([rng.permutation(13), 13 + rng.permutation(14)])
    with torch.no_grad():
        a = untruncated(make_batch(ref, structures=(0, 1)), features=(K.NODE, K.E2N, K.E2V))
        b = untruncated(make_batch(ref, order=order, structures=(0, 1)), features=(K.NODE, K.E2N, K.E2V))
    idx = torch.as_tensor(order)
    assert rel(b[K.ENERGY], a[K.ENERGY]) < 1e-8
    for key in (K.FORCES, K.ATOM_ENERGY, K.NODE, K.E2N, K.E2V):
        assert rel(b[key], a[key][idx]) < 1e-8, key
    assert rel(a[K.FORCES][idx], a[K.FORCES]) > 1e-2  # the permutation does move atoms


# ----------------------------------------------------------------------------------------------
# gradient forces
# ----------------------------------------------------------------------------------------------
TINY = dict(
    num_spherical=3, num_radial=6, num_blocks=1, emb_size_atom=8, emb_size_edge=8,
    emb_size_trip_in=4, emb_size_trip_out=4, emb_size_quad_in=4, emb_size_quad_out=4,
    emb_size_aint_in=4, emb_size_aint_out=4, emb_size_rbf=4, emb_size_cbf=4, emb_size_sbf=4,
    num_before_skip=1, num_after_skip=1, num_concat=1, num_atom=1, num_output_afteratom=1,
    num_atom_emb_layers=1, num_global_out_layers=1, cutoff=4.0,
    # limits above the real neighbour counts: the energy is then smooth in the positions
    max_neighbors=500, max_neighbors_qint=500, max_neighbors_aeaint=500, max_neighbors_aint=500,
    sbf={"name": "legendre_outer"}, quad_interaction=True, atom_edge_interaction=True,
    edge_atom_interaction=True, atom_interaction=True, qint_tags=[1, 2],
)


def test_gradient_forces_match_finite_differences(ref):
    torch.manual_seed(1)
    model = GemNetOC(**TINY, direct_forces=False).double().eval()
    assert model.available_features == (K.NODE,)
    data = make_batch(ref, structures=(0,))
    with torch.no_grad():  # gradient forces must work inside no_grad too (stage-one inference)
        forces = model(data)[K.FORCES]
    assert forces.shape == (13, 3) and not forces.requires_grad

    def energy(pos):
        d = data.clone()
        d.pos = pos
        with torch.no_grad():
            return float(model(d)[K.ENERGY].sum())

    h = 1e-5
    for atom, axis in ((12, 0), (9, 2), (3, 1)):
        plus, minus = data.pos.clone(), data.pos.clone()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = -(energy(plus) - energy(minus)) / (2 * h)
        assert abs(float(forces[atom, axis]) - fd) < 1e-6 * max(1.0, float(forces.abs().max())), (atom, axis)
    assert float(forces.abs().max()) > 1e-3  # not trivially zero
    with pytest.raises(ValueError):
        model(data, features=(K.EDGE,))


# ----------------------------------------------------------------------------------------------
# interaction indices
# ----------------------------------------------------------------------------------------------
def test_index_helpers():
    assert ragged_arange(torch.tensor([1, 4, 0, 2])).tolist() == [0, 0, 1, 2, 3, 0, 1]
    assert inner_index(torch.tensor([0, 0, 0, 1, 1, 3]), 4).tolist() == [0, 1, 2, 0, 1, 0]


def test_triplets_and_quadruplets_on_the_reference_graph(ref, model):
    with torch.no_grad():
        graphs = model.build_graphs(make_batch(ref).pos, make_batch(ref))
    main, qint, n = graphs["main_graph"], graphs["qint_graph"], 47
    s, t = main[K.EDGE_INDEX]
    trip = get_triplets(main, n)
    # every edge c->a receives every other edge into a
    indeg = torch.bincount(t, minlength=n)
    assert torch.equal(torch.bincount(trip["out"], minlength=s.shape[0]), indeg[t] - 1)
    assert bool((t[trip["in"]] == t[trip["out"]]).all()) and bool((trip["in"] != trip["out"]).all())
    assert bool((trip["out"][1:] >= trip["out"][:-1]).all())
    # counter edges: (s, t, o) <-> (t, s, -o)
    sw = graphs["id_swap"]
    assert torch.equal(s[sw], t) and torch.equal(main[K.CELL_OFFSET][sw], -main[K.CELL_OFFSET])
    # quadruplet graph only touches qint_tags atoms
    tags = torch.as_tensor(ref["tags"])
    qs, qt = qint[K.EDGE_INDEX]
    assert bool(((tags[qs] > 0) | (tags[qt] > 0)).all())
    quad = get_quadruplets(main, qint, n)
    d_edge = quad["triplet_in"]["in"][quad["trip_in_to_quad"]]
    b_edge = quad["triplet_in"]["out"][quad["trip_in_to_quad"]]
    assert torch.equal(b_edge, quad["triplet_out"]["in"][quad["trip_out_to_quad"]])
    assert torch.equal(quad["out"], quad["triplet_out"]["out"][quad["trip_out_to_quad"]])
    assert bool((t[d_edge] == qs[b_edge]).all()) and bool((qt[b_edge] == t[quad["out"]]).all())
    # c != d unless they are different images
    off_cd = main[K.CELL_OFFSET][d_edge] + qint[K.CELL_OFFSET][b_edge] - main[K.CELL_OFFSET][quad["out"]]
    assert bool(((s[quad["out"]] != s[d_edge]) | (off_cd != 0).any(-1)).all())
    assert quad["out"].numel() > 0


# ----------------------------------------------------------------------------------------------
# bases
# ----------------------------------------------------------------------------------------------
def test_spherical_harmonics_are_orthonormal_with_the_reference_signs():
    z_nodes, z_weights = np.polynomial.legendre.leggauss(12)  # exact for these polynomials in z
    phi = np.arange(32) * 2 * np.pi / 32
    z = torch.as_tensor(np.repeat(z_nodes, 32))
    p = torch.as_tensor(np.tile(phi, 12))
    w = torch.as_tensor(np.repeat(z_weights, 32) * 2 * np.pi / 32)
    Y = real_spherical_harmonics(4)(z, p)  # [T, 16]
    gram = (Y * w[:, None]).T @ Y
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=1e-12)
    # l = 1 columns (m = 0, 1, -1) are sqrt(3/4π) (z, x, y): the reference's sign convention
    c = math.sqrt(3 / (4 * math.pi))
    sin_t = torch.sqrt(1 - z**2)
    assert torch.allclose(Y[:, 1:4], c * torch.stack([z, sin_t * torch.cos(p), sin_t * torch.sin(p)], 1), atol=1e-12)
    # the m = 0 basis is the m = 0 subset of the full one
    assert torch.allclose(legendre_harmonics(4)(z), Y[:, [0, 1, 4, 9]], atol=1e-12)


def test_polynomial_envelope_is_smooth_at_the_cutoff():
    env = PolynomialEnvelope(5)
    d = torch.tensor([0.0, 1 - 1e-4, 1.0, 1.3], dtype=torch.float64, requires_grad=True)
    u = env(d)
    (g,) = torch.autograd.grad(u.sum(), d)
    u = u.detach()
    assert float(u[0]) == 1.0 and abs(float(u[1])) < 1e-10 and float(u[2]) == 0.0 and float(u[3]) == 0.0
    assert abs(float(g[1])) < 1e-5  # ~ (1 - d)^2: value and slope vanish at the cutoff


# ----------------------------------------------------------------------------------------------
# OC20 preset
# ----------------------------------------------------------------------------------------------
def test_oc20_preset_has_38_9_million_parameters():
    from kdcache.models.presets import GEMNET_OC_OC20

    with torch.device("meta"):  # count only; no memory, no real initialisation
        model = GemNetOC(**GEMNET_OC_OC20)
    assert model.num_params == 38_864_438
    assert round(model.num_params / 1e6, 1) == 38.9
