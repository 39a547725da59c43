"""Message-passing and output blocks of GemNet-OC.

Notation: an edge c->a (source c, target a) carries the embedding m_ca. A triplet b->a<-c feeds
edge b->a into edge c->a; a quadruplet d->b->a<-c feeds d->b through b->a into c->a. Mixed
triplets connect edges of two different graphs (atom-to-edge, edge-to-atom).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcache import keys as K
from kdcache.models.gemnet_oc.indices import TARGET_NEIGHBOR_IDX
from kdcache.models.gemnet_oc.layers import Dense, EdgeEmbedding, EfficientInteractionBilinear, ResidualLayer
from kdcache.models.scaling import ScaleFactor

_INV_SQRT_2 = 1 / math.sqrt(2.0)


def _sum_into(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return x.new_zeros((size, *x.shape[1:])).index_add_(0, index, x)


class TripletInteraction(nn.Module):
    """Triplet message passing: radial gate on the incoming edge, circular basis per triplet.

    Used for edge->edge (main graph), atom->edge and edge->atom (mixed graphs) interactions.

    Args:
        emb_size_in: width of the incoming embeddings (edge or atom).
        emb_size_out: width of the outputs (edge or atom).
        emb_size_trip_in: down-projected width before the bilinear layer.
        emb_size_trip_out: width after the bilinear layer.
        emb_size_rbf: width of the shared radial projection.
        emb_size_cbf: width of the shared circular projection.
        symmetric_mp: update c->a and a->c together (two up-projections).
        swap_output: without symmetric_mp, write the result onto the reverse edge.
        activation: activation of the dense layers.
    """

    def __init__(
        self,
        emb_size_in: int,
        emb_size_out: int,
        emb_size_trip_in: int,
        emb_size_trip_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        symmetric_mp: bool = True,
        swap_output: bool = True,
        activation: str | None = None,
    ):
        super().__init__()
        self.symmetric_mp = symmetric_mp
        self.swap_output = swap_output
        self.dense_ba = Dense(emb_size_in, emb_size_in, activation=activation)
        self.mlp_rbf = Dense(emb_size_rbf, emb_size_in)
        self.scale_rbf = ScaleFactor()
        self.mlp_cbf = EfficientInteractionBilinear(emb_size_trip_in, emb_size_cbf, emb_size_trip_out)
        self.scale_cbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_in, emb_size_trip_in, activation=activation)
        self.up_projection_ca = Dense(emb_size_trip_out, emb_size_out, activation=activation)
        if symmetric_mp:
            self.up_projection_ac = Dense(emb_size_trip_out, emb_size_out, activation=activation)

    def forward(
        self,
        m: torch.Tensor,
        bases: dict,
        idx: dict,
        id_swap: torch.Tensor,
        expand_idx: torch.Tensor | None = None,
        idx_agg2: torch.Tensor | None = None,
        idx_agg2_inner: torch.Tensor | None = None,
        agg2_out_size: int | None = None,
    ) -> torch.Tensor:
        x_ba = self.dense_ba(m)
        if expand_idx is not None:  # atom->edge: atom embeddings onto the edges they start
            x_ba = x_ba[expand_idx]
        x_ba = self.scale_rbf(x_ba * self.mlp_rbf(bases["rad"]), ref=x_ba)
        x_ba = self.down_projection(x_ba)[idx["in"]]  # one row per triplet
        x = self.mlp_cbf(
            basis=bases["cir"],
            m=x_ba,
            idx_agg_outer=idx["out"],
            idx_agg_inner=idx["out_agg"],
            idx_agg2_outer=idx_agg2,
            idx_agg2_inner=idx_agg2_inner,
            agg2_out_size=agg2_out_size,
        )
        x = self.scale_cbf_sum(x, ref=x_ba)
        if self.symmetric_mp:
            # the reverse direction gets its own projection, swapped onto the counter-edge
            x_ca = self.up_projection_ca(x)
            x_ac = self.up_projection_ac(x)[id_swap]
            return (x_ca + x_ac) * _INV_SQRT_2
        if self.swap_output:
            x = x[id_swap]
        return self.up_projection_ca(x)


class QuadrupletInteraction(nn.Module):
    """Quadruplet message passing d->b->a<-c with radial, circular and spherical bases.

    Args:
        emb_size_edge: edge embedding width.
        emb_size_quad_in: down-projected width before the bilinear layer.
        emb_size_quad_out: width after the bilinear layer.
        emb_size_rbf: width of the shared radial projection.
        emb_size_cbf: width of the shared circular projection.
        emb_size_sbf: width of the shared spherical projection.
        symmetric_mp: update c->a and a->c together.
        activation: activation of the dense layers.
    """

    def __init__(
        self,
        emb_size_edge: int,
        emb_size_quad_in: int,
        emb_size_quad_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        emb_size_sbf: int,
        symmetric_mp: bool = True,
        activation: str | None = None,
    ):
        super().__init__()
        self.symmetric_mp = symmetric_mp
        self.dense_db = Dense(emb_size_edge, emb_size_edge, activation=activation)
        self.mlp_rbf = Dense(emb_size_rbf, emb_size_edge)
        self.scale_rbf = ScaleFactor()
        self.mlp_cbf = Dense(emb_size_cbf, emb_size_quad_in)
        self.scale_cbf = ScaleFactor()
        self.mlp_sbf = EfficientInteractionBilinear(emb_size_quad_in, emb_size_sbf, emb_size_quad_out)
        self.scale_sbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_edge, emb_size_quad_in, activation=activation)
        self.up_projection_ca = Dense(emb_size_quad_out, emb_size_edge, activation=activation)
        if symmetric_mp:
            self.up_projection_ac = Dense(emb_size_quad_out, emb_size_edge, activation=activation)

    def forward(self, m: torch.Tensor, bases: dict, idx: dict, id_swap: torch.Tensor) -> torch.Tensor:
        x_db = self.dense_db(m)
        x_db = self.scale_rbf(x_db * self.mlp_rbf(bases["rad"]), ref=x_db)
        x_db = self.down_projection(x_db)[idx["triplet_in"]["in"]]  # per input triplet d->b->a
        x_db = self.scale_cbf(x_db * self.mlp_cbf(bases["cir"]), ref=x_db)
        x_db = x_db[idx["trip_in_to_quad"]]  # per quadruplet
        x = self.mlp_sbf(bases["sph"], x_db, idx["out"], idx["out_agg"])
        x = self.scale_sbf_sum(x, ref=x_db)
        if self.symmetric_mp:
            x_ca = self.up_projection_ca(x)
            x_ac = self.up_projection_ac(x)[id_swap]
            return (x_ca + x_ac) * _INV_SQRT_2
        return self.up_projection_ca(x)


class PairInteraction(nn.Module):
    """Atom->atom message passing on the (largest) atom-atom graph with a radial bilinear map.

    Args:
        emb_size_atom: atom embedding width.
        emb_size_pair_in: down-projected width before the bilinear layer.
        emb_size_pair_out: width after the bilinear layer.
        emb_size_rbf: width of the shared radial projection.
        activation: activation of the dense layers.
    """

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_pair_in: int,
        emb_size_pair_out: int,
        emb_size_rbf: int,
        activation: str | None = None,
    ):
        super().__init__()
        self.bilinear = Dense(emb_size_rbf * emb_size_pair_in, emb_size_pair_out)
        self.scale_rbf_sum = ScaleFactor()
        self.down_projection = Dense(emb_size_atom, emb_size_pair_in, activation=activation)
        self.up_projection = Dense(emb_size_pair_out, emb_size_atom, activation=activation)

    def forward(
        self, h: torch.Tensor, rad_basis: torch.Tensor, edge_index: torch.Tensor, target_neighbor_idx: torch.Tensor
    ) -> torch.Tensor:
        n_atoms = h.shape[0]
        x_ba = self.down_projection(h)[edge_index[0]]
        k = rad_basis.shape[-1]  # [A, rbf, K]: the padded width, from the same neighbour index
        padded = x_ba.new_zeros(n_atoms, k, x_ba.shape[-1])
        padded[edge_index[1], target_neighbor_idx] = x_ba  # [A, K, in]
        out = self.bilinear((rad_basis @ padded).reshape(n_atoms, -1))
        out = self.scale_rbf_sum(out, ref=x_ba)
        return self.up_projection(out)


class AtomUpdateBlock(nn.Module):
    """Sum radially gated edge embeddings onto their target atom, then an MLP.

    Args:
        emb_size_atom: atom embedding width (output).
        emb_size_edge: edge embedding width.
        emb_size_rbf: width of the shared radial projection.
        nHidden: residual layers of the MLP.
        activation: activation of the dense layers.
    """

    def __init__(self, emb_size_atom: int, emb_size_edge: int, emb_size_rbf: int, nHidden: int, activation=None):
        super().__init__()
        self.dense_rbf = Dense(emb_size_rbf, emb_size_edge)
        self.scale_sum = ScaleFactor()
        self.layers = self.get_mlp(emb_size_edge, emb_size_atom, nHidden, activation)

    @staticmethod
    def get_mlp(units_in: int, units: int, n_hidden: int, activation) -> nn.ModuleList:
        mlp: list[nn.Module] = []
        if units_in != units:
            mlp.append(Dense(units_in, units, activation=activation))
        mlp += [ResidualLayer(units, n_layers=2, activation=activation) for _ in range(n_hidden)]
        return nn.ModuleList(mlp)

    def aggregate(self, m: torch.Tensor, basis_rad: torch.Tensor, idx_atom: torch.Tensor, n_atoms: int) -> torch.Tensor:
        x = _sum_into(m * self.dense_rbf(basis_rad), idx_atom, n_atoms)
        return self.scale_sum(x, ref=m)

    def forward(self, h: torch.Tensor, m: torch.Tensor, basis_rad: torch.Tensor, idx_atom: torch.Tensor) -> torch.Tensor:
        x = self.aggregate(m, basis_rad, idx_atom, h.shape[0])
        for layer in self.layers:
            x = layer(x)
        return x


class OutputBlock(AtomUpdateBlock):
    """Per-block output: atom features x_E (energy branch) and edge features x_F (force branch).

    Args:
        emb_size_atom: atom embedding width.
        emb_size_edge: edge embedding width.
        emb_size_rbf: width of the shared radial projection.
        nHidden: residual layers before adding the atom embedding (and of the force MLP).
        nHidden_afteratom: residual layers after adding the atom embedding.
        activation: activation of the dense layers.
        direct_forces: build the edge (force) branch.
    """

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_rbf: int,
        nHidden: int,
        nHidden_afteratom: int,
        activation: str | None = None,
        direct_forces: bool = True,
    ):
        super().__init__(emb_size_atom, emb_size_edge, emb_size_rbf, nHidden, activation)
        self.direct_forces = direct_forces
        # same module under the reference's second name (checkpoints list both)
        self.seq_energy_pre = self.layers
        if nHidden_afteratom >= 1:
            self.seq_energy2 = self.get_mlp(emb_size_atom, emb_size_atom, nHidden_afteratom, activation)
        else:
            self.seq_energy2 = None
        if direct_forces:
            self.scale_rbf_F = ScaleFactor()
            self.seq_forces = self.get_mlp(emb_size_edge, emb_size_edge, nHidden, activation)
            self.dense_rbf_F = Dense(emb_size_rbf, emb_size_edge)

    def forward(self, h: torch.Tensor, m: torch.Tensor, basis_rad: torch.Tensor, idx_atom: torch.Tensor):
        x_E = self.aggregate(m, basis_rad, idx_atom, h.shape[0])
        for layer in self.seq_energy_pre:
            x_E = layer(x_E)
        if self.seq_energy2 is not None:
            x_E = (x_E + h) * _INV_SQRT_2
            for layer in self.seq_energy2:
                x_E = layer(x_E)

        x_F = None
        if self.direct_forces:
            x_F = m
            for layer in self.seq_forces:
                x_F = layer(x_F)
            x_F = self.scale_rbf_F(x_F * self.dense_rbf_F(basis_rad), ref=x_F)
        return x_E, x_F


class InteractionBlock(nn.Module):
    """One GemNet-OC interaction: edge updates from triplets, quadruplets and atoms; atom updates
    from edges and atoms; then edges refreshed with the new atom embeddings.

    Args:
        emb_size_atom, emb_size_edge: embedding widths.
        emb_size_trip_in, emb_size_trip_out: triplet bilinear widths.
        emb_size_quad_in, emb_size_quad_out: quadruplet bilinear widths.
        emb_size_a2a_in, emb_size_a2a_out: atom-atom bilinear widths.
        emb_size_rbf, emb_size_cbf, emb_size_sbf: widths of the shared basis projections.
        num_before_skip, num_after_skip: residual layers around the edge skip connection.
        num_concat: residual layers after re-embedding edges with atoms.
        num_atom: residual layers of the atom update.
        num_atom_emb_layers: residual layers transforming atom embeddings.
        quad_interaction, atom_edge_interaction, edge_atom_interaction, atom_interaction:
            which interactions to use.
        activation: activation of the dense layers.
    """

    def __init__(
        self,
        emb_size_atom: int,
        emb_size_edge: int,
        emb_size_trip_in: int,
        emb_size_trip_out: int,
        emb_size_quad_in: int,
        emb_size_quad_out: int,
        emb_size_a2a_in: int,
        emb_size_a2a_out: int,
        emb_size_rbf: int,
        emb_size_cbf: int,
        emb_size_sbf: int,
        num_before_skip: int,
        num_after_skip: int,
        num_concat: int,
        num_atom: int,
        num_atom_emb_layers: int = 0,
        quad_interaction: bool = False,
        atom_edge_interaction: bool = False,
        edge_atom_interaction: bool = False,
        atom_interaction: bool = False,
        activation: str | None = None,
    ):
        super().__init__()
        trip = dict(
            emb_size_trip_in=emb_size_trip_in,
            emb_size_trip_out=emb_size_trip_out,
            emb_size_rbf=emb_size_rbf,
            emb_size_cbf=emb_size_cbf,
            activation=activation,
        )
        self.dense_ca = Dense(emb_size_edge, emb_size_edge, activation=activation)
        self.trip_interaction = TripletInteraction(emb_size_edge, emb_size_edge, symmetric_mp=True, swap_output=True, **trip)
        self.quad_interaction = (
            QuadrupletInteraction(
                emb_size_edge, emb_size_quad_in, emb_size_quad_out, emb_size_rbf, emb_size_cbf, emb_size_sbf,
                symmetric_mp=True, activation=activation,
            )
            if quad_interaction
            else None
        )
        self.atom_edge_interaction = (
            TripletInteraction(emb_size_atom, emb_size_edge, symmetric_mp=True, swap_output=True, **trip)
            if atom_edge_interaction
            else None
        )
        self.edge_atom_interaction = (
            TripletInteraction(emb_size_edge, emb_size_atom, symmetric_mp=False, swap_output=False, **trip)
            if edge_atom_interaction
            else None
        )
        self.atom_interaction = (
            PairInteraction(emb_size_atom, emb_size_a2a_in, emb_size_a2a_out, emb_size_rbf, activation=activation)
            if atom_interaction
            else None
        )

        def residuals(units: int, n: int) -> nn.ModuleList:
            return nn.ModuleList([ResidualLayer(units, activation=activation) for _ in range(n)])

        self.layers_before_skip = residuals(emb_size_edge, num_before_skip)
        self.layers_after_skip = residuals(emb_size_edge, num_after_skip)
        self.atom_emb_layers = residuals(emb_size_atom, num_atom_emb_layers)
        self.atom_update = AtomUpdateBlock(emb_size_atom, emb_size_edge, emb_size_rbf, nHidden=num_atom, activation=activation)
        self.concat_layer = EdgeEmbedding(emb_size_atom, emb_size_edge, emb_size_edge, activation=activation)
        self.residual_m = residuals(emb_size_edge, num_concat)

        # each sum of k unit-variance terms is divided by sqrt(k)
        self.inv_sqrt_num_eint = 1 / math.sqrt(2.0 + quad_interaction + atom_edge_interaction)
        self.inv_sqrt_num_aint = 1 / math.sqrt(1.0 + edge_atom_interaction + atom_interaction)

    def forward(
        self,
        h: torch.Tensor,
        m: torch.Tensor,
        bases_qint: dict,
        bases_e2e: dict,
        bases_a2e: dict,
        bases_e2a: dict,
        basis_a2a_rad: torch.Tensor | None,
        basis_atom_update: torch.Tensor,
        edge_index_main: torch.Tensor,
        a2ee2a_graph: dict,
        a2a_graph: dict,
        id_swap: torch.Tensor,
        trip_idx_e2e: dict,
        trip_idx_a2e: dict,
        trip_idx_e2a: dict,
        quad_idx: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_atoms = h.shape[0]

        # ---- messages onto edges (all from the embeddings entering the block) ----
        x = self.dense_ca(m) + self.trip_interaction(m, bases_e2e, trip_idx_e2e, id_swap)
        if self.quad_interaction is not None:
            x = x + self.quad_interaction(m, bases_qint, quad_idx, id_swap)
        if self.atom_edge_interaction is not None:
            x = x + self.atom_edge_interaction(
                h, bases_a2e, trip_idx_a2e, id_swap, expand_idx=a2ee2a_graph[K.EDGE_INDEX][0]
            )
        x = x * self.inv_sqrt_num_eint

        # ---- messages onto atoms ----
        h_new = h
        if self.edge_atom_interaction is not None:
            h_new = h_new + self.edge_atom_interaction(
                m,
                bases_e2a,
                trip_idx_e2a,
                id_swap,
                idx_agg2=a2ee2a_graph[K.EDGE_INDEX][1],
                idx_agg2_inner=a2ee2a_graph[TARGET_NEIGHBOR_IDX],
                agg2_out_size=n_atoms,
            )
        if self.atom_interaction is not None:
            h_new = h_new + self.atom_interaction(
                h, basis_a2a_rad, a2a_graph[K.EDGE_INDEX], a2a_graph[TARGET_NEIGHBOR_IDX]
            )
        h = h_new * self.inv_sqrt_num_aint

        # ---- edge update with skip connection ----
        for layer in self.layers_before_skip:
            x = layer(x)
        m = (m + x) * _INV_SQRT_2
        for layer in self.layers_after_skip:
            m = layer(m)

        # ---- atom update ----
        for layer in self.atom_emb_layers:
            h = layer(h)
        h = (h + self.atom_update(h, m, basis_atom_update, edge_index_main[1])) * _INV_SQRT_2

        # ---- refresh edges with the updated atoms ----
        m2 = self.concat_layer(h, m, edge_index_main)
        for layer in self.residual_m:
            m2 = layer(m2)
        m = (m + m2) * _INV_SQRT_2
        return h, m
