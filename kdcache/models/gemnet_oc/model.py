"""GemNet-OC (Gasteiger et al., TMLR 2022), the teacher of the distillation pipeline.

Four graphs on the same atoms, each with its own cutoff and neighbour limit:

* atom-atom (``a2a``, the largest; built by :func:`kdcache.graph.radius_graph_pbc`),
* main (embedded edges; made symmetric so every edge has its counter-edge),
* atom-edge/edge-atom (``a2ee2a``),
* quadruplet (``qint``; only edges touching atoms whose tag is in ``qint_tags``).

Graphs are always built on the fly from positions (the reference's ``otf_graph=True``), so
precomputed dataset graphs are never needed.

Constructor arguments carry the Open Catalyst names (``model_attributes`` of a checkpoint) and
the module tree reproduces its parameter names, so an OCP checkpoint's ``state_dict`` (minus the
``module.`` prefix) loads directly.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from kdcache import graph as G
from kdcache import keys as K
from kdcache.errors import DataError
from kdcache.features import aggregate_edge_features
from kdcache.models.base import ModelInputs, PotentialModel
from kdcache.models.fast_auto import GEMNET_OC_PAYOFF
from kdcache.models.gemnet_oc.bases import CircularBasisLayer, SphericalBasisLayer
from kdcache.models.gemnet_oc.blocks import InteractionBlock, OutputBlock
from kdcache.models.gemnet_oc.indices import (
    BUCKETS,
    PAD_WIDTH,
    RAGGED,
    TARGET_NEIGHBOR_IDX,
    edge_buckets,
    get_mixed_triplets,
    get_quadruplets,
    get_triplets,
    inner_index,
    inner_size,
)
from kdcache.models.gemnet_oc.layers import (
    AtomEmbedding,
    BasisEmbedding,
    Dense,
    EdgeEmbedding,
    ResidualLayer,
    get_initializer,
)
from kdcache.models.radial import RadialBasis
from kdcache.models.scaling import apply_scale_file


#: graph keys: ``[N]`` atoms in each atom's structure (``extensive=False`` only); ``[E]`` the edge
#: of the parent radius graph each edge of a derived graph is, and ``[E]`` its direction (1, or -1
#: where symmetrisation reversed it)
_STRUCTURE_SIZE = "structure_size"
_PARENT_EDGE = "parent_edge"
_DIRECTION = "direction"


def _with_pad_width(idx: dict) -> dict:
    """An interaction index dict with the padded width of its ``out_agg`` (:data:`PAD_WIDTH`)."""
    if "out_agg" in idx:
        idx[PAD_WIDTH] = inner_size(idx["out_agg"])
    return idx


def _cos_clamped(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine between unit vectors, clamped to [-1, 1] against rounding."""
    return (x * y).sum(dim=-1).clamp(min=-1, max=1)


def _angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle between u and v via atan2(|u×v|, u·v); |u×v| floored so the gradient stays finite."""
    x = (u * v).sum(dim=-1)
    y = torch.linalg.cross(u, v, dim=-1).norm(dim=-1).clamp(min=1e-9)
    return torch.atan2(y, x)


class GemNetOC(PotentialModel):
    """GemNet-OC energy and force model.

    Args (Open Catalyst names):
        num_spherical: angular functions per angle.
        num_radial: radial functions.
        num_blocks: interaction blocks.
        emb_size_atom, emb_size_edge: atom and edge embedding widths.
        emb_size_trip_in, emb_size_trip_out: triplet bilinear widths.
        emb_size_quad_in, emb_size_quad_out: quadruplet bilinear widths.
        emb_size_aint_in, emb_size_aint_out: atom-atom bilinear widths.
        emb_size_rbf, emb_size_cbf, emb_size_sbf: widths of the shared basis projections.
        num_before_skip, num_after_skip, num_concat, num_atom: residual layers of the blocks.
        num_output_afteratom: residual layers of the output blocks after adding atoms.
        num_atom_emb_layers: residual layers on the atom embeddings in each block.
        num_global_out_layers: residual layers of the global output MLPs.
        regress_forces: predict forces.
        direct_forces: forces as Σ_edges F_st · unit vector (True) or -∂E/∂pos (False).
        use_pbc: use periodic images (per structure as given by ``pbc``); False = molecules.
        cutoff, cutoff_qint, cutoff_aeaint, cutoff_aint: cutoffs (Å) of the four graphs; the
            optional ones default as in the reference (the main cutoff; the largest for a2a).
        max_neighbors, max_neighbors_qint, max_neighbors_aeaint, max_neighbors_aint:
            neighbour limits of the four graphs, defaulted likewise.
        enforce_max_neighbors_strictly: cut exactly at the limit even inside degenerate shells.
        rbf, rbf_spherical, envelope, cbf, sbf: basis choices (``{"name": ..., **hparams}``).
        extensive: energy = sum (True) or mean (False) of atom energies.
        forces_coupled: average F_st and F_ts (direct forces only).
        output_init: initialiser of the final layers (``HeOrthogonal`` or ``zeros``).
        activation: ``silu``.
        quad_interaction, atom_edge_interaction, edge_atom_interaction, atom_interaction:
            which interactions to use.
        scale_basis: fitted scale factors on the raw bases.
        qint_tags: atom tags that take part in quadruplet interactions (OC20: [1, 2]).
        num_elements: elements covered by the atom embedding (Z = 1..num_elements).
        scale_file: scale factors to load (``.pt``/``.json`` file or dict ``module path -> value``).
        otf_graph, use_pbc_single, scale_backprop_forces: Open Catalyst settings that are
            accepted and ignored: graphs are always built on the fly and batched, and
            float64/float32 force scaling is not needed. Any other unknown argument is refused,
            as by every model.
    """

    name = "gemnet_oc"
    #: its generated kernels are mostly padded fills and pointwise work, few scatter-adds: on all
    #: threads (kdcache.models.fast.GENERATED_KERNEL_THREADS)
    fast_kernels_threaded = True
    available_features = (K.NODE, K.EDGE, K.E2N, K.E2V)
    fast_payoff = GEMNET_OC_PAYOFF  # what `fast: auto` weighs (kdcache.models.fast_auto)

    def __init__(
        self,
        num_spherical: int,
        num_radial: int,
        num_blocks: int,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_trip_in: int,
        emb_size_trip_out: int,
        emb_size_quad_in: int,
        emb_size_quad_out: int,
        emb_size_aint_in: int,
        emb_size_aint_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        emb_size_sbf: int,
        num_before_skip: int,
        num_after_skip: int,
        num_concat: int,
        num_atom: int,
        num_output_afteratom: int,
        num_atom_emb_layers: int = 0,
        num_global_out_layers: int = 2,
        regress_forces: bool = True,
        direct_forces: bool = False,
        use_pbc: bool = True,
        cutoff: float = 6.0,
        cutoff_qint: float | None = None,
        cutoff_aeaint: float | None = None,
        cutoff_aint: float | None = None,
        max_neighbors: int = 50,
        max_neighbors_qint: int | None = None,
        max_neighbors_aeaint: int | None = None,
        max_neighbors_aint: int | None = None,
        enforce_max_neighbors_strictly: bool = True,
        rbf: dict | None = None,
        rbf_spherical: dict | None = None,
        envelope: dict | None = None,
        cbf: dict | None = None,
        sbf: dict | None = None,
        extensive: bool = True,
        forces_coupled: bool = False,
        output_init: str = "HeOrthogonal",
        activation: str = "silu",
        quad_interaction: bool = False,
        atom_edge_interaction: bool = False,
        edge_atom_interaction: bool = False,
        atom_interaction: bool = False,
        scale_basis: bool = False,
        qint_tags: list | tuple | None = None,
        num_elements: int = 83,
        scale_file: str | dict | None = None,
        otf_graph: bool = True,
        use_pbc_single: bool = False,
        scale_backprop_forces: bool = False,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.config = copy.deepcopy({k: v for k, v in locals().items() if k not in ("self", "__class__")})

        rbf = rbf or {"name": "gaussian"}
        rbf_spherical = rbf_spherical or rbf
        envelope = envelope or {"name": "polynomial", "exponent": 5}
        cbf = cbf or {"name": "spherical_harmonics"}
        sbf = sbf or {"name": "spherical_harmonics"}
        qint_tags = [0, 1, 2] if qint_tags is None else list(qint_tags)

        self.num_blocks = num_blocks
        self.extensive = extensive
        self.activation = activation
        self.quad_interaction = quad_interaction
        self.atom_edge_interaction = atom_edge_interaction
        self.edge_atom_interaction = edge_atom_interaction
        self.atom_interaction = atom_interaction
        self.qint_tags = tuple(int(t) for t in qint_tags)
        self.use_pbc = use_pbc
        self.regress_forces = regress_forces
        self.direct_forces = direct_forces
        self.forces_coupled = forces_coupled
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.max_atomic_number = num_elements  # embedding row Z - 1 holds element Z
        if not direct_forces:
            # edge features only exist on the direct-force branch
            self.available_features = (K.NODE,)
        self._set_cutoffs(cutoff, cutoff_qint, cutoff_aeaint, cutoff_aint)
        self._set_max_neighbors(max_neighbors, max_neighbors_qint, max_neighbors_aeaint, max_neighbors_aint)

        # --- bases (registration order = the reference's, so parameter order and names match) ---
        def radial(c: float, kind: dict) -> RadialBasis:
            return RadialBasis(num_radial=num_radial, cutoff=c, rbf=kind, envelope=envelope, scale_basis=scale_basis)

        self.radial_basis = radial(self.cutoff, rbf)
        radial_spherical = radial(self.cutoff, rbf_spherical)  # shared by several angular bases
        if quad_interaction:
            self.cbf_basis_qint = CircularBasisLayer(
                num_spherical, radial(self.cutoff_qint, rbf_spherical), cbf, scale_basis
            )
            self.sbf_basis_qint = SphericalBasisLayer(num_spherical, radial_spherical, sbf, scale_basis)
        if atom_edge_interaction or edge_atom_interaction:
            self.radial_basis_aeaint = radial(self.cutoff_aeaint, rbf)
        if atom_edge_interaction:
            self.cbf_basis_aeint = CircularBasisLayer(num_spherical, radial_spherical, cbf, scale_basis)
        if edge_atom_interaction:
            self.cbf_basis_eaint = CircularBasisLayer(
                num_spherical, radial(self.cutoff_aeaint, rbf_spherical), cbf, scale_basis
            )
        if atom_interaction:
            self.radial_basis_aint = radial(self.cutoff_aint, rbf)
        self.cbf_basis_tint = CircularBasisLayer(num_spherical, radial_spherical, cbf, scale_basis)

        # --- basis projections shared by all interaction blocks ---
        def rad_proj() -> Dense:
            return Dense(num_radial, emb_size_rbf)

        if quad_interaction:
            self.mlp_rbf_qint = rad_proj()
            self.mlp_cbf_qint = BasisEmbedding(num_radial, emb_size_cbf, num_spherical)
            self.mlp_sbf_qint = BasisEmbedding(num_radial, emb_size_sbf, num_spherical**2)
        if atom_edge_interaction:
            self.mlp_rbf_aeint = rad_proj()
            self.mlp_cbf_aeint = BasisEmbedding(num_radial, emb_size_cbf, num_spherical)
        if edge_atom_interaction:
            self.mlp_rbf_eaint = rad_proj()
            self.mlp_cbf_eaint = BasisEmbedding(num_radial, emb_size_cbf, num_spherical)
        if atom_interaction:
            self.mlp_rbf_aint = BasisEmbedding(num_radial, emb_size_rbf)
        self.mlp_rbf_tint = rad_proj()
        self.mlp_cbf_tint = BasisEmbedding(num_radial, emb_size_cbf, num_spherical)
        self.mlp_rbf_h = rad_proj()
        self.mlp_rbf_out = rad_proj()
        # --- embeddings, blocks, outputs ---
        self.atom_emb = AtomEmbedding(emb_size_atom, num_elements)
        self.edge_emb = EdgeEmbedding(emb_size_atom, num_radial, emb_size_edge, activation=activation)
        self.int_blocks = nn.ModuleList(
            InteractionBlock(
                emb_size_atom=emb_size_atom,
                emb_size_edge=emb_size_edge,
                emb_size_trip_in=emb_size_trip_in,
                emb_size_trip_out=emb_size_trip_out,
                emb_size_quad_in=emb_size_quad_in,
                emb_size_quad_out=emb_size_quad_out,
                emb_size_a2a_in=emb_size_aint_in,
                emb_size_a2a_out=emb_size_aint_out,
                emb_size_rbf=emb_size_rbf,
                emb_size_cbf=emb_size_cbf,
                emb_size_sbf=emb_size_sbf,
                num_before_skip=num_before_skip,
                num_after_skip=num_after_skip,
                num_concat=num_concat,
                num_atom=num_atom,
                num_atom_emb_layers=num_atom_emb_layers,
                quad_interaction=quad_interaction,
                atom_edge_interaction=atom_edge_interaction,
                edge_atom_interaction=edge_atom_interaction,
                atom_interaction=atom_interaction,
                activation=activation,
            )
            for _ in range(num_blocks)
        )
        self.out_blocks = nn.ModuleList(
            OutputBlock(
                emb_size_atom=emb_size_atom,
                emb_size_edge=emb_size_edge,
                emb_size_rbf=emb_size_rbf,
                nHidden=num_atom,
                nHidden_afteratom=num_output_afteratom,
                activation=activation,
                direct_forces=direct_forces,
            )
            for _ in range(num_blocks + 1)
        )

        def global_mlp(units: int) -> nn.Sequential:
            return nn.Sequential(
                Dense(units * (num_blocks + 1), units, activation=activation),
                *[ResidualLayer(units, activation=activation) for _ in range(num_global_out_layers)],
            )

        self.out_mlp_E = global_mlp(emb_size_atom)
        self.out_energy = Dense(emb_size_atom, 1)
        if direct_forces:
            self.out_mlp_F = global_mlp(emb_size_edge)
            self.out_forces = Dense(emb_size_edge, 1)
        init = get_initializer(output_init)
        self.out_energy.reset_parameters(init)
        if direct_forces:
            self.out_forces.reset_parameters(init)

        if scale_file:
            apply_scale_file(self, scale_file)

    # ------------------------------------------------------------------------------------------
    # cutoffs and neighbour limits (defaults as the reference)
    # ------------------------------------------------------------------------------------------
    def _set_cutoffs(self, cutoff, cutoff_qint, cutoff_aeaint, cutoff_aint) -> None:
        self.cutoff = cutoff
        aeaint = self.atom_edge_interaction or self.edge_atom_interaction
        self.cutoff_aeaint = cutoff_aeaint if aeaint and cutoff_aeaint is not None else cutoff
        self.cutoff_qint = cutoff_qint if self.quad_interaction and cutoff_qint is not None else cutoff
        if self.atom_interaction and cutoff_aint is not None:
            self.cutoff_aint = cutoff_aint
        else:
            self.cutoff_aint = max(self.cutoff, self.cutoff_aeaint, self.cutoff_qint)
        if not (self.cutoff <= self.cutoff_aint and self.cutoff_aeaint <= self.cutoff_aint
                and self.cutoff_qint <= self.cutoff_aint):
            raise ValueError("cutoff_aint must be the largest cutoff")

    def _set_max_neighbors(self, max_neighbors, max_qint, max_aeaint, max_aint) -> None:
        self.max_neighbors = max_neighbors
        aeaint = self.atom_edge_interaction or self.edge_atom_interaction
        self.max_neighbors_aeaint = max_aeaint if aeaint and max_aeaint is not None else max_neighbors
        self.max_neighbors_qint = max_qint if self.quad_interaction and max_qint is not None else max_neighbors
        if self.atom_interaction and max_aint is not None:
            self.max_neighbors_aint = max_aint
        else:
            self.max_neighbors_aint = max(max_neighbors, self.max_neighbors_aeaint, self.max_neighbors_qint)
        if not (max_neighbors <= self.max_neighbors_aint and self.max_neighbors_aeaint <= self.max_neighbors_aint
                and self.max_neighbors_qint <= self.max_neighbors_aint):
            raise ValueError("max_neighbors_aint must be the largest neighbour limit")

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------
    # graphs and indices
    # ------------------------------------------------------------------------------------------
    def _subgraph(self, parent: dict, batch_vec, n_struct, cutoff, max_nb, parent_cutoff, parent_max) -> dict:
        """Tighter cutoff / neighbour limit, applied only where they differ from the parent's."""
        return G.select_edges(
            parent,
            batch_vec,
            cutoff=None if np.isclose(cutoff, parent_cutoff) else cutoff,
            max_neighbors=None if max_nb == parent_max else max_nb,
            enforce_max_neighbors_strictly=self.enforce_max_neighbors_strictly,
            num_structures=n_struct,
        )

    def _tagged_edges(self, graph: dict, data, batch_vec: torch.Tensor, n_struct: int) -> dict:
        """The edges of ``graph`` that touch an atom whose tag is in ``qint_tags``."""
        tags = data[K.TAGS] if K.TAGS in data else None
        if tags is None:
            raise DataError("<batch>", None, K.TAGS, "GemNet-OC quadruplet interactions need atom tags")
        tags = tags.to(batch_vec.device)
        s, t = graph[K.EDGE_INDEX]
        allowed = torch.tensor(self.qint_tags, dtype=tags.dtype, device=tags.device)
        tag_ok = (tags[:, None] == allowed).any(dim=-1)
        return G.mask_edges(graph, tag_ok[s] | tag_ok[t], batch_vec, n_struct)

    def build_graphs(self, pos: torch.Tensor, data) -> dict:
        """All graphs and interaction indices of one batch, with distances and unit vectors.

        Args:
            pos: ``[N, 3]`` positions to build from (the geometry is differentiable in them).
            data: the batch (``natoms`` and optionally ``cell``, ``pbc``, ``batch``, ``tags``).
        """
        structures = G.batch_structures(data, pos, self.use_pbc)
        z = data[K.ATOMIC_NUMBERS] if K.ATOMIC_NUMBERS in data else None
        return self._geometry(pos, self.make_graph(ModelInputs(data, pos, z, structures)))

    def make_graph(self, inputs: ModelInputs) -> dict:
        """The four graphs (edge index, cell offset, and which edge of the parent radius graph each
        edge is), the parent's per-edge shifts, the triplet and quadruplet indices and the padded
        widths of one batch; no positions-dependent values (distances and vectors are
        :meth:`_geometry`'s, from the positions, inside the body).

        Args:
            inputs: the prepared batch (``tags`` are read from ``inputs.data`` for quadruplets).
        """
        cell, _, natoms, batch_vec = inputs.structures
        pos = inputs.pos.detach()  # graph selection only: distances decide which edges exist
        n_struct = natoms.shape[0]

        def radius_graph(c: float, max_nb: int) -> dict:
            edge_index, offset, neighbors = inputs.radius_graph(c, max_nb, self.enforce_max_neighbors_strictly)
            distance, vector = G.edge_geometry(pos, cell, batch_vec, edge_index, offset)
            # which parent edge each derived edge is, and its direction (-1: reversed), carried
            # through selection and symmetrisation like any per-edge entry
            return {K.EDGE_INDEX: edge_index, K.CELL_OFFSET: offset, G.DISTANCE: distance, K.EDGE_VECTOR: vector,
                    G.NEIGHBORS: neighbors, _PARENT_EDGE: torch.arange(edge_index.shape[1], device=pos.device),
                    _DIRECTION: torch.ones(edge_index.shape[1], dtype=pos.dtype, device=pos.device)}

        uses_a2a = self.atom_edge_interaction or self.edge_atom_interaction or self.atom_interaction
        a2a_graph, a2ee2a_graph = {}, {}
        if uses_a2a:
            a2a_graph = radius_graph(self.cutoff_aint, self.max_neighbors_aint)
            parent, pc, pm = a2a_graph, self.cutoff_aint, self.max_neighbors_aint
            main_graph = self._subgraph(parent, batch_vec, n_struct, self.cutoff, self.max_neighbors, pc, pm)
            a2ee2a_graph = self._subgraph(
                parent, batch_vec, n_struct, self.cutoff_aeaint, self.max_neighbors_aeaint, pc, pm
            )
        else:
            main_graph = radius_graph(self.cutoff, self.max_neighbors)
            parent, pc, pm = main_graph, self.cutoff, self.max_neighbors

        qint_graph = {}
        if self.quad_interaction:
            qint_graph = self._subgraph(parent, batch_vec, n_struct, self.cutoff_qint, self.max_neighbors_qint, pc, pm)
            qint_graph = self._tagged_edges(qint_graph, inputs.data, batch_vec, n_struct)

        # Everything below depends on these edge sets alone (and the cell, tags): MD steps whose
        # selection did not change reuse it (ModelInputs.derived).
        key = [t for graph in (parent, main_graph, a2ee2a_graph, qint_graph) if graph
               for t in (graph[K.EDGE_INDEX], graph[K.CELL_OFFSET])]
        return inputs.derived(self, key, lambda: self._derived_graph(
            inputs, parent, main_graph, a2a_graph, a2ee2a_graph, qint_graph))

    def fast_graph(self, inputs: ModelInputs, graph: dict) -> dict:
        """The compiled path's graph on the CPU: the quadruplets' spherical sum without most of
        the reference layout's padding.

        The reference pads every edge's quadruplets to K, the most of any edge (~250 on OC20
        slabs, about 3.5x their mean; half the edges have none), so its padded matrices were
        mostly zeros: filling them (fresh pages, at 142-217 MB a matrix) and multiplying the zeros
        took more time than any other part of the model. The compiled path instead sums

        * on one generated-kernel thread, over the quadruplets themselves
          (:data:`~kdcache.models.gemnet_oc.indices.RAGGED`, a scatter-add);
        * on more, where that scatter-add is atomic (0.29x the eager model on two threads), over
          :func:`~kdcache.models.gemnet_oc.indices.edge_buckets`: padded matrices per group of
          edges with similar counts, padded 1.2-1.3x
          (:data:`~kdcache.models.gemnet_oc.indices.BUCKETS`).

        Measured on 2 OC20-like batches, eager / fast, in one process: one thread, ragged 1.62x
        against bucketed 1.46x (an earlier run: ragged 1.53x, padded 1.39x); two threads,
        bucketed 1.42x and 1.48x (4 and 8 buckets) against padded 1.19x and 1.25x in the same
        runs (docs/benchmarks-models.md). The triplets' padding is ~1.2x: their
        padded layout stays. CUDA keeps the reference layout (not measured there).
        """
        if not self.quad_interaction or self.fast_path is None or inputs.pos.device.type != "cpu":
            return graph
        quad_idx = graph["quad_idx"]
        if self.fast_path.kernel_threads == 1:
            return {**graph, "quad_idx": {**quad_idx, RAGGED: True}}
        num_edges = graph["main_graph"][K.EDGE_INDEX].shape[1]
        key = [quad_idx["out"], quad_idx["out_agg"]]
        # an owner of its own: the neighbour list keeps one value per owner, and make_graph's is the model
        buckets = inputs.derived((self, BUCKETS), key,
                                 lambda: edge_buckets(quad_idx["out"], quad_idx["out_agg"], num_edges))
        if buckets is None:  # fewer than 2 edges with quadruplets
            return graph
        return {**graph, "quad_idx": {**quad_idx, BUCKETS: buckets}}

    def _derived_graph(self, inputs: ModelInputs, parent: dict, main_graph: dict, a2a_graph: dict,
                       a2ee2a_graph: dict, qint_graph: dict) -> dict:
        """:meth:`make_graph` from the selected edge sets on: symmetrisation, interaction indices,
        padded widths, per-edge shifts (the graphs' own dicts are not modified)."""
        cell, _, natoms, batch_vec = inputs.structures
        n_struct, n_atoms = natoms.shape[0], inputs.pos.shape[0]
        dtype = inputs.pos.dtype
        a2a_graph, a2ee2a_graph = dict(a2a_graph), dict(a2ee2a_graph)
        # every main edge needs its counter-edge for symmetric message passing
        main_graph = G.symmetrize_graph(main_graph, batch_vec, n_struct, keep_self_image="negative",
                                        odd_keys=(K.EDGE_VECTOR, _DIRECTION))
        id_swap = main_graph[G.ID_SWAP]

        trip_idx_e2e = _with_pad_width(get_triplets(main_graph, num_atoms=n_atoms))
        quad_idx = _with_pad_width(get_quadruplets(main_graph, qint_graph, n_atoms)) if self.quad_interaction else {}
        trip_idx_a2e, trip_idx_e2a = {}, {}
        if self.atom_edge_interaction:
            trip_idx_a2e = _with_pad_width(get_mixed_triplets(a2ee2a_graph, main_graph, n_atoms, return_agg_idx=True))
        if self.edge_atom_interaction:
            trip_idx_e2a = _with_pad_width(get_mixed_triplets(main_graph, a2ee2a_graph, n_atoms, return_agg_idx=True))
            # the a2ee2a graph is sorted by target, as the padded aggregation needs
            a2ee2a_graph[TARGET_NEIGHBOR_IDX] = inner_index(a2ee2a_graph[K.EDGE_INDEX][1], n_atoms)
            a2ee2a_graph[PAD_WIDTH] = inner_size(a2ee2a_graph[TARGET_NEIGHBOR_IDX])
        if self.atom_interaction:
            a2a_graph[TARGET_NEIGHBOR_IDX] = inner_index(a2a_graph[K.EDGE_INDEX][1], n_atoms)
            a2a_graph[PAD_WIDTH] = inner_size(a2a_graph[TARGET_NEIGHBOR_IDX])

        def index_only(graph: dict) -> dict:
            # geometry comes from the positions, in the body; per-structure counts are not used
            return {k: v for k, v in graph.items() if k not in (G.DISTANCE, K.EDGE_VECTOR, G.NEIGHBORS)}

        out = dict(
            # the radius graph all others are taken from: the only one whose geometry is computed
            parent={K.EDGE_INDEX: parent[K.EDGE_INDEX],
                    G.EDGE_SHIFT: G.edge_shifts(cell, batch_vec, parent[K.EDGE_INDEX], parent[K.CELL_OFFSET], dtype)},
            main_graph=index_only(main_graph), a2a_graph=index_only(a2a_graph),
            a2ee2a_graph=index_only(a2ee2a_graph), qint_graph=index_only(qint_graph),
            id_swap=id_swap, trip_idx_e2e=trip_idx_e2e, trip_idx_a2e=trip_idx_a2e, trip_idx_e2a=trip_idx_e2a,
            quad_idx=quad_idx,
        )
        if not self.extensive:
            out[_STRUCTURE_SIZE] = natoms[batch_vec]
        return out

    @staticmethod
    def _geometry(pos: torch.Tensor, g: dict) -> dict:
        """``g`` with distances and unit vectors of every graph's edges: those of the parent
        radius graph from ``pos``, the others taken from them (as the graphs were derived)."""
        distance, vector = G.edge_vectors(pos, g["parent"][K.EDGE_INDEX], g["parent"][G.EDGE_SHIFT])
        g = dict(g)
        a2a_is_parent = bool(g["a2a_graph"])
        if a2a_is_parent:
            g["a2a_graph"] = {**g["a2a_graph"], G.DISTANCE: distance, K.EDGE_VECTOR: vector}
        # in the order the eager graph code derived them (a2a parent: main first; else main last),
        # so that gradients reach the parent's geometry in the same order, to the bit
        order = ("main_graph", "a2ee2a_graph", "qint_graph") if a2a_is_parent else ("qint_graph", "main_graph")
        for name in order:
            if g[name]:
                edge = g[name][_PARENT_EDGE]
                vec = vector[edge]
                if name == "main_graph":
                    vec = vec * g[name][_DIRECTION][:, None]
                g[name] = {**g[name], G.DISTANCE: distance[edge], K.EDGE_VECTOR: vec}
        return g

    # ------------------------------------------------------------------------------------------
    # bases
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _quad_angles(v_main: torch.Tensor, v_qint: torch.Tensor, quad_idx: dict):
        """cos(c-a-b), cos(a-b-d) and the dihedral c-a-b-d of every quadruplet."""
        t_in, t_out = quad_idx["triplet_in"], quad_idx["triplet_out"]
        # d -> b -> a
        v_ba = v_qint[t_in["out"]]
        v_db = v_main[t_in["in"]]
        cos_abd = _cos_clamped(v_ba, v_db)
        # normals of the planes (a, b, d) and (c, a, b); their angle is the dihedral (no sign)
        n_db = torch.linalg.cross(v_db, v_ba, dim=-1)[quad_idx["trip_in_to_quad"]]
        # c -> a <- b
        v_ca = v_main[t_out["out"]]
        v_ba_out = v_qint[t_out["in"]]
        cos_cab = _cos_clamped(v_ca, v_ba_out)
        n_ca = torch.linalg.cross(v_ca, v_ba_out, dim=-1)[quad_idx["trip_out_to_quad"]]
        return cos_cab, cos_abd, _angle(n_ca, n_db)

    def get_bases(self, g: dict, num_atoms: int):
        main, a2a, a2ee2a, qint = g["main_graph"], g["a2a_graph"], g["a2ee2a_graph"], g["qint_graph"]
        trip_e2e, trip_a2e, trip_e2a, quad_idx = g["trip_idx_e2e"], g["trip_idx_a2e"], g["trip_idx_e2a"], g["quad_idx"]

        rad_main = self.radial_basis(main[G.DISTANCE])
        cos_e2e = _cos_clamped(main[K.EDGE_VECTOR][trip_e2e["out"]], main[K.EDGE_VECTOR][trip_e2e["in"]])
        rad_cir_e2e, cir_e2e = self.cbf_basis_tint(main[G.DISTANCE], cos_e2e)

        bases_qint: dict = {}
        if self.quad_interaction:
            cos_cab, cos_abd, dihedral = self._quad_angles(main[K.EDGE_VECTOR], qint[K.EDGE_VECTOR], quad_idx)
            rad_cir_q, cir_q = self.cbf_basis_qint(qint[G.DISTANCE], cos_abd)
            rad_sph_q, sph_q = self.sbf_basis_qint(
                main[G.DISTANCE], cos_cab[quad_idx["trip_out_to_quad"]], dihedral
            )
            bases_qint["rad"] = self.mlp_rbf_qint(rad_main)
            bases_qint["cir"] = self.mlp_cbf_qint(
                rad_basis=rad_cir_q, sph_basis=cir_q, idx_sph_outer=quad_idx["triplet_in"]["out"]
            )
            bases_qint["sph"] = self.mlp_sbf_qint(
                rad_basis=rad_sph_q, sph_basis=sph_q, idx_sph_outer=quad_idx["out"], idx_sph_inner=quad_idx["out_agg"],
                sph_inner_size=quad_idx[PAD_WIDTH], ragged=quad_idx.get(RAGGED, False),
                buckets=quad_idx.get(BUCKETS),
            )

        bases_a2e: dict = {}
        if self.atom_edge_interaction:
            rad_a2ee2a = self.radial_basis_aeaint(a2ee2a[G.DISTANCE])
            cos_a2e = _cos_clamped(main[K.EDGE_VECTOR][trip_a2e["out"]], a2ee2a[K.EDGE_VECTOR][trip_a2e["in"]])
            rad_cir_a2e, cir_a2e = self.cbf_basis_aeint(main[G.DISTANCE], cos_a2e)
            bases_a2e["rad"] = self.mlp_rbf_aeint(rad_a2ee2a)
            bases_a2e["cir"] = self.mlp_cbf_aeint(
                rad_basis=rad_cir_a2e, sph_basis=cir_a2e, idx_sph_outer=trip_a2e["out"], idx_sph_inner=trip_a2e["out_agg"],
                sph_inner_size=trip_a2e[PAD_WIDTH],
            )

        bases_e2a: dict = {}
        if self.edge_atom_interaction:
            cos_e2a = _cos_clamped(a2ee2a[K.EDGE_VECTOR][trip_e2a["out"]], main[K.EDGE_VECTOR][trip_e2a["in"]])
            rad_cir_e2a, cir_e2a = self.cbf_basis_eaint(a2ee2a[G.DISTANCE], cos_e2a)
            bases_e2a["rad"] = self.mlp_rbf_eaint(rad_main)
            bases_e2a["cir"] = self.mlp_cbf_eaint(
                rad_basis=rad_cir_e2a,
                sph_basis=cir_e2a,
                idx_rad_outer=a2ee2a[K.EDGE_INDEX][1],
                idx_rad_inner=a2ee2a[TARGET_NEIGHBOR_IDX],
                idx_sph_outer=trip_e2a["out"],
                idx_sph_inner=trip_e2a["out_agg"],
                num_atoms=num_atoms,
                rad_inner_size=a2ee2a[PAD_WIDTH],
                sph_inner_size=trip_e2a[PAD_WIDTH],
            )

        basis_a2a_rad = None
        if self.atom_interaction:
            basis_a2a_rad = self.mlp_rbf_aint(
                rad_basis=self.radial_basis_aint(a2a[G.DISTANCE]),
                idx_rad_outer=a2a[K.EDGE_INDEX][1],
                idx_rad_inner=a2a[TARGET_NEIGHBOR_IDX],
                num_atoms=num_atoms,
                rad_inner_size=a2a[PAD_WIDTH],
            )

        bases_e2e = {
            "rad": self.mlp_rbf_tint(rad_main),
            "cir": self.mlp_cbf_tint(
                rad_basis=rad_cir_e2e, sph_basis=cir_e2e, idx_sph_outer=trip_e2e["out"], idx_sph_inner=trip_e2e["out_agg"],
                sph_inner_size=trip_e2e[PAD_WIDTH],
            ),
        }
        return dict(
            rad_main=rad_main,
            basis_atom_update=self.mlp_rbf_h(rad_main),
            basis_output=self.mlp_rbf_out(rad_main),
            bases_qint=bases_qint,
            bases_e2e=bases_e2e,
            bases_a2e=bases_a2e,
            bases_e2a=bases_e2a,
            basis_a2a_rad=basis_a2a_rad,
        )

    # ------------------------------------------------------------------------------------------
    # body
    # ------------------------------------------------------------------------------------------
    def body(self, pos: torch.Tensor, atomic_numbers: torch.Tensor, graph: dict, wanted) -> dict[str, torch.Tensor]:
        """Atom energies, direct forces and features (raw units).

        Args:
            pos: ``[N, 3]`` positions.
            atomic_numbers: ``[N]``.
            graph: from :meth:`make_graph`.
            wanted: any of ``node`` (x_E [N, emb_atom], always returned), ``edge`` (x_F
                [E, emb_edge] of the main graph, with ``edge_index``, ``edge_vector``,
                ``cell_offset``), ``e2n`` and ``e2v`` (their per-atom sums, see
                :mod:`kdcache.features`; computed only when asked for).
        """
        g = self._geometry(pos, graph)
        num_atoms = pos.shape[0]
        main = g["main_graph"]
        edge_index = main[K.EDGE_INDEX]
        xs_E, xs_F = self._interactions(atomic_numbers, g, self.get_bases(g, num_atoms))

        node = self.out_mlp_E(torch.cat(xs_E, dim=-1))  # x_E [N, emb_atom]
        atom_energy = self.out_energy(node).squeeze(-1)  # [N]
        if not self.extensive:
            # per-atom shares of a mean, so that they still sum to the structure's energy
            atom_energy = atom_energy / g[_STRUCTURE_SIZE].to(atom_energy.dtype)
        out = {K.ATOM_ENERGY: atom_energy, K.NODE: node}
        if not self.direct_forces:
            return out  # gradient forces: -dE/dpos, taken by the base class; no edge features

        edge = self.out_mlp_F(torch.cat(xs_F, dim=-1))  # x_F [E, emb_edge]
        if self.regress_forces:
            f_st = self.out_forces(edge)  # [E, 1]
            if self.forces_coupled:
                # |F_st| = |F_ts|: average each edge with its counter-edge
                f_st = (f_st + f_st[g["id_swap"]]) / 2
            f_vec = f_st * main[K.EDGE_VECTOR]  # [E, 3] along each edge, onto its target
            out[K.FORCES] = f_vec.new_zeros(num_atoms, 3).index_add_(0, edge_index[1], f_vec)
        out.update({K.EDGE: edge, K.EDGE_INDEX: edge_index, K.EDGE_VECTOR: main[K.EDGE_VECTOR],
                    K.CELL_OFFSET: main[K.CELL_OFFSET]})
        if K.E2N in wanted or K.E2V in wanted:
            out.update(aggregate_edge_features(edge, edge_index, main[K.EDGE_VECTOR], num_atoms,
                                               want_e2n=K.E2N in wanted, want_e2v=K.E2V in wanted))
        return out

    def _interactions(self, z: torch.Tensor, g: dict, b: dict) -> tuple[list, list]:
        """Embeddings, then the interaction blocks; the atom (x_E) and edge (x_F) outputs of the
        embedding and of every block, for the global output MLPs."""
        edge_index = g["main_graph"][K.EDGE_INDEX]
        idx_t = edge_index[1]
        h = self.atom_emb(z)
        m = self.edge_emb(h, b["rad_main"], edge_index)
        x_E, x_F = self.out_blocks[0](h, m, b["basis_output"], idx_t)
        xs_E, xs_F = [x_E], [x_F]
        for i, block in enumerate(self.int_blocks):
            h, m = block(
                h=h,
                m=m,
                bases_qint=b["bases_qint"],
                bases_e2e=b["bases_e2e"],
                bases_a2e=b["bases_a2e"],
                bases_e2a=b["bases_e2a"],
                basis_a2a_rad=b["basis_a2a_rad"],
                basis_atom_update=b["basis_atom_update"],
                edge_index_main=edge_index,
                a2ee2a_graph=g["a2ee2a_graph"],
                a2a_graph=g["a2a_graph"],
                id_swap=g["id_swap"],
                trip_idx_e2e=g["trip_idx_e2e"],
                trip_idx_a2e=g["trip_idx_a2e"],
                trip_idx_e2a=g["trip_idx_e2a"],
                quad_idx=g["quad_idx"],
            )
            x_E, x_F = self.out_blocks[i + 1](h, m, b["basis_output"], idx_t)
            xs_E.append(x_E)
            xs_F.append(x_F)
        return xs_E, xs_F
