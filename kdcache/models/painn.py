"""PaiNN (Schütt et al. 2021, arXiv:2102.03150) as trained by the Open Catalyst Project.

Scalar features ``x [N, d]`` and vector features ``vec [N, 3, d]`` are updated by alternating
message and update blocks; energies come from a per-atom MLP on ``x``, forces either from a
gated-equivariant head on ``(x, vec)`` (``direct_forces=True``, the OC20 setting) or as
``-dE/dpos``. Module and parameter names follow the reference implementation so that Open
Catalyst checkpoints load key for key (``kdcache.models.checkpoint``).

Graph: radius graph with periodic images, at most ``max_neighbors`` nearest neighbours per
atom (strict), then made symmetric the way the reference does — an edge ``s -> t`` is kept when
``s < t`` (for a periodic self-image, when its cell offset is the "earlier" of the pair) and
every kept edge is paired with its reverse. Inside this module ``edge_dir`` is the unit vector
from the target atom t to the source atom s (the reference's ``r_ij``); note this is the
*opposite* of :data:`kdcache.keys.EDGE_VECTOR`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcache import graph as G
from kdcache import keys as K
from kdcache.models.base import ModelInputs, PotentialModel
from kdcache.models.fast_auto import STUDENT_PAYOFF
from kdcache.models.common import EDGE_PAIR, PAIR_EDGE, student_edges, student_geometry, with_edge_pairs
# shared, model-neutral building blocks (never from the teacher's package: students must not
# import kdcache.models.gemnet_oc)
from kdcache.models.radial import RadialBasis
from kdcache.models.scaling import ScaleFactor, ScaledSiLU, apply_scale_file

# ---------------------------------------------------------------------------------------------
# small building blocks
# ---------------------------------------------------------------------------------------------


class AtomEmbedding(nn.Module):
    """Learned embedding of the element; row ``Z - 1`` holds element Z (no row for Z = 0).

    Args:
        emb_size: channels.
        num_elements: number of elements covered (Z = 1 .. num_elements).
    """

    def __init__(self, emb_size: int, num_elements: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(num_elements, emb_size)
        nn.init.uniform_(self.embeddings.weight, -math.sqrt(3), math.sqrt(3))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.embeddings(z - 1)


def mlp2(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    """Linear -> ScaledSiLU -> Linear (indices 0 and 2 carry the weights, as in checkpoints)."""
    return nn.Sequential(nn.Linear(n_in, n_hidden), ScaledSiLU(), nn.Linear(n_hidden, n_out))


def _xavier_zero_bias(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------
# PaiNN blocks
# ---------------------------------------------------------------------------------------------


class PaiNNMessage(nn.Module):
    """Message block: each atom t gathers filtered scalar and vector messages from its sources.

    Args:
        hidden_channels: d.
        num_rbf: radial basis size.
    """

    def __init__(self, hidden_channels: int, num_rbf: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.x_proj = mlp2(hidden_channels, hidden_channels, 3 * hidden_channels)
        self.rbf_proj = nn.Linear(num_rbf, 3 * hidden_channels)
        self.x_layernorm = nn.LayerNorm(hidden_channels)
        self.inv_sqrt_3 = 1 / math.sqrt(3.0)
        self.inv_sqrt_h = 1 / math.sqrt(hidden_channels)
        _xavier_zero_bias(self.x_proj[0])
        _xavier_zero_bias(self.x_proj[2])
        _xavier_zero_bias(self.rbf_proj)

    def forward(self, x, vec, src, dst, edge_rbf, edge_dir, edge_pair=None):
        """``edge_rbf`` per edge, or per atom pair with ``edge_pair [E]`` (the fast path's
        :func:`~kdcache.models.common.with_edge_pairs`: the radial filter once per pair)."""
        d = self.hidden_channels
        radial = self.rbf_proj(edge_rbf)
        if edge_pair is not None:
            radial = radial[edge_pair]
        filt = self.x_proj(self.x_layernorm(x))[src] * radial  # [E, 3d]
        ds, gate_v, gate_r = filt.split(d, dim=-1)
        gate_v = gate_v * self.inv_sqrt_3
        dv = vec[src] * gate_v[:, None, :] + gate_r[:, None, :] * edge_dir[:, :, None]
        dv = dv * self.inv_sqrt_h
        dx = x.new_zeros(x.shape[0], d).index_add_(0, dst, ds)
        dvec = dv.new_zeros(x.shape[0], 3, d).index_add_(0, dst, dv)
        return dx, dvec


class PaiNNUpdate(nn.Module):
    """Update block: mixes each atom's scalar and vector channels (no neighbours involved).

    Args:
        hidden_channels: d.
    """

    def __init__(self, hidden_channels: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.vec_proj = nn.Linear(hidden_channels, 2 * hidden_channels, bias=False)
        self.xvec_proj = mlp2(2 * hidden_channels, hidden_channels, 3 * hidden_channels)
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)
        self.inv_sqrt_h = 1 / math.sqrt(hidden_channels)
        nn.init.xavier_uniform_(self.vec_proj.weight)
        _xavier_zero_bias(self.xvec_proj[0])
        _xavier_zero_bias(self.xvec_proj[2])

    def forward(self, x, vec):
        d = self.hidden_channels
        u, v = self.vec_proj(vec).split(d, dim=-1)  # [N, 3, d] each
        uv = (u * v).sum(dim=1) * self.inv_sqrt_h
        # |v| with a small offset: the plain norm has an undefined gradient at v = 0, which is
        # where every atom starts.
        v_norm = torch.sqrt((v * v).sum(dim=1) + 1e-8)
        a_ss, a_sv, a_vv = self.xvec_proj(torch.cat([x, v_norm], dim=-1)).split(d, dim=-1)
        dx = (a_ss + a_sv * uv) * self.inv_sqrt_2
        dvec = a_vv[:, None, :] * u
        return dx, dvec


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (Schütt et al. 2021): scalars gate linear maps of the vectors.

    Args:
        hidden_channels: input channels.
        out_channels: output channels.
    """

    def __init__(self, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.vec1_proj = nn.Linear(hidden_channels, hidden_channels, bias=False)
        self.vec2_proj = nn.Linear(hidden_channels, out_channels, bias=False)
        self.update_net = mlp2(2 * hidden_channels, hidden_channels, 2 * out_channels)
        self.act = ScaledSiLU()
        nn.init.xavier_uniform_(self.vec1_proj.weight)
        nn.init.xavier_uniform_(self.vec2_proj.weight)
        _xavier_zero_bias(self.update_net[0])
        _xavier_zero_bias(self.update_net[2])

    def forward(self, x, vec):
        v_norm = torch.linalg.vector_norm(self.vec1_proj(vec), dim=-2)
        v_out = self.vec2_proj(vec)
        s, gate = self.update_net(torch.cat([x, v_norm], dim=-1)).split(self.out_channels, dim=-1)
        return self.act(s), gate[:, None, :] * v_out


class PaiNNOutput(nn.Module):
    """Direct force head: two gated equivariant blocks d -> d/2 -> 1, the vector is the force.

    Args:
        hidden_channels: d.
    """

    def __init__(self, hidden_channels: int) -> None:
        super().__init__()
        self.output_network = nn.ModuleList(
            [GatedEquivariantBlock(hidden_channels, hidden_channels // 2), GatedEquivariantBlock(hidden_channels // 2, 1)]
        )

    def forward(self, x, vec):
        for block in self.output_network:
            x, vec = block(x, vec)
        return vec[..., 0]  # [N, 3]


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


class PaiNN(PotentialModel):
    """PaiNN with the Open Catalyst constructor arguments and state-dict layout.

    ``forward`` (:class:`~kdcache.models.base.PotentialModel`) returns raw (normalised)
    ``energy [S]``, ``forces [N, 3]``, ``atom_energy [N]`` and, on request, ``node`` = final
    scalar features ``x [N, d]`` and ``vector`` = final vector features ``vec [N, 3, d]`` (both
    are computed anyway, so asking costs nothing).

    Args:
        hidden_channels: d, channels of x and vec.
        num_layers: message/update block pairs.
        num_rbf: radial basis functions.
        cutoff: graph cutoff (Å).
        max_neighbors: nearest neighbours kept per atom before symmetrisation.
        rbf: radial basis (``{"name": "gaussian"}``).
        envelope: cutoff envelope (``{"name": "polynomial", "exponent": 5}``).
        regress_forces: predict forces at all.
        direct_forces: forces from the gated-equivariant head (True) or as -dE/dpos (False).
        use_pbc: periodic images in the graph (where the structure's ``pbc`` says so).
        use_pbc_single: accepted for config compatibility (graphs are built per batch).
        otf_graph: accepted for config compatibility (graphs are always built on the fly).
        num_elements: elements covered by the embedding (Z = 1 .. num_elements).
        scale_file: optional scale-factor file (JSON or .pt, names ``upd_out_scalar_scale_<i>``).
    """

    name = "painn"
    available_features = (K.NODE, K.VECTOR)
    fast_payoff = STUDENT_PAYOFF  # what `fast: auto` weighs (kdcache.models.fast_auto)

    def __init__(
        self,
        hidden_channels: int = 512,
        num_layers: int = 6,
        num_rbf: int = 128,
        cutoff: float = 12.0,
        max_neighbors: int = 50,
        rbf: dict | None = None,
        envelope: dict | None = None,
        regress_forces: bool = True,
        direct_forces: bool = True,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        otf_graph: bool = True,
        num_elements: int = 83,
        scale_file: str | None = None,
    ) -> None:
        super().__init__()
        rbf = dict(rbf or {"name": "gaussian"})
        envelope = dict(envelope or {"name": "polynomial", "exponent": 5})
        self.config = dict(
            hidden_channels=hidden_channels,
            num_layers=num_layers,
            num_rbf=num_rbf,
            cutoff=float(cutoff),
            max_neighbors=max_neighbors,
            rbf=dict(rbf),
            envelope=dict(envelope),
            regress_forces=regress_forces,
            direct_forces=direct_forces,
            use_pbc=use_pbc,
            use_pbc_single=use_pbc_single,
            otf_graph=otf_graph,
            num_elements=num_elements,
        )
        self.hidden_channels = hidden_channels
        self.num_layers = num_layers
        self.cutoff = float(cutoff)
        self.max_neighbors = max_neighbors
        self.regress_forces = regress_forces
        self.direct_forces = direct_forces
        self.use_pbc = use_pbc
        self.max_atomic_number = num_elements  # embedding row Z - 1 holds element Z

        # Registration order matters: EMA shadow parameters in checkpoints follow it.
        self.atom_emb = AtomEmbedding(hidden_channels, num_elements)
        self.radial_basis = RadialBasis(num_rbf, self.cutoff, rbf=rbf, envelope=envelope)
        self.message_layers = nn.ModuleList()
        self.update_layers = nn.ModuleList()
        for i in range(num_layers):
            self.message_layers.append(PaiNNMessage(hidden_channels, num_rbf))
            self.update_layers.append(PaiNNUpdate(hidden_channels))
            self.add_module(f"upd_out_scalar_scale_{i}", ScaleFactor())
        self.out_energy = mlp2(hidden_channels, hidden_channels // 2, 1)
        _xavier_zero_bias(self.out_energy[0])
        _xavier_zero_bias(self.out_energy[2])
        if regress_forces and direct_forces:
            self.out_forces = PaiNNOutput(hidden_channels)
        self.inv_sqrt_2 = 1 / math.sqrt(2.0)

        if scale_file is not None:
            apply_scale_file(self, scale_file)

    # --- graph ----------------------------------------------------------------------------------
    def build_graph(self, batch, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """The symmetric PaiNN graph of a batch: ``src``, ``dst`` [E], ``dist`` [E] and
        ``edge_dir`` [E, 3] (unit vector from target to source), differentiable in ``pos``."""
        inputs = ModelInputs(batch, pos, batch[K.ATOMIC_NUMBERS], G.batch_structures(batch, pos, self.use_pbc))
        return self._geometry(pos, self.make_graph(inputs))

    def make_graph(self, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        """The symmetric radius graph (:func:`kdcache.models.common.student_edges`)."""
        return student_edges(inputs, self.cutoff, self.max_neighbors, symmetric=True)

    def fast_graph(self, inputs: ModelInputs, graph: dict) -> dict:
        """The compiled path's graph: with atom pairs, so each message layer's radial filter is
        computed once per pair (half the edges) instead of once per edge."""
        return with_edge_pairs(inputs, graph)

    @staticmethod
    def _geometry(pos: torch.Tensor, graph: dict) -> dict[str, torch.Tensor]:
        src, dst, dist, edge_vector = student_geometry(pos, graph)
        return {"src": src, "dst": dst, "dist": dist, "edge_dir": -edge_vector}

    # --- body -----------------------------------------------------------------------------------
    def body(self, pos: torch.Tensor, atomic_numbers: torch.Tensor, graph: dict,
             wanted) -> dict[str, torch.Tensor]:
        """Atom energies, direct forces, and ``node`` = x, ``vector`` = vec (computed anyway).

        Args:
            pos: ``[N, 3]`` positions.
            atomic_numbers: ``[N]``.
            graph: from :meth:`make_graph`.
            wanted: requested features (both are always returned; the base class picks).
        """
        edge_pair = graph.get(EDGE_PAIR)  # the fast path's: radial filters once per atom pair
        pair_edge = graph.get(PAIR_EDGE)
        graph = self._geometry(pos, graph)
        src, dst, edge_dir = graph["src"], graph["dst"], graph["edge_dir"]
        dist = graph["dist"] if edge_pair is None else graph["dist"][pair_edge]
        edge_rbf = self.radial_basis(dist)

        x = self.atom_emb(atomic_numbers)
        vec = x.new_zeros(x.shape[0], 3, x.shape[1])
        for i in range(self.num_layers):
            dx, dvec = self.message_layers[i](x, vec, src, dst, edge_rbf, edge_dir, edge_pair)
            x = (x + dx) * self.inv_sqrt_2
            vec = vec + dvec
            dx, dvec = self.update_layers[i](x, vec)
            x = getattr(self, f"upd_out_scalar_scale_{i}")(x + dx)
            vec = vec + dvec

        out = {K.ATOM_ENERGY: self.out_energy(x)[:, 0], K.NODE: x, K.VECTOR: vec}
        if self.regress_forces and self.direct_forces:
            out[K.FORCES] = self.out_forces(x, vec)
        # Gradient forces (direct_forces=False) are -dE/dpos, taken by the base class. (The
        # reference differentiates the sum of the node features instead, which is not a force;
        # we use the physical definition.)
        return out
