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
from typing import Iterable

import torch
from torch import nn

from kdcache import keys as K
from kdcache.models.base import PotentialModel
# shared, model-neutral building blocks (never from the teacher's package: students must not
# import kdcache.models.gemnet_oc); re-exported here for existing imports (e.g. SchNet)
from kdcache.models.radial import (  # noqa: F401
    ExponentialEnvelope,
    GaussianBasis,
    PolynomialEnvelope,
    RadialBasis,
)
from kdcache.models.scaling import ScaleFactor, ScaledSiLU  # noqa: F401

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

    def forward(self, x, vec, src, dst, edge_rbf, edge_dir):
        d = self.hidden_channels
        filt = self.x_proj(self.x_layernorm(x))[src] * self.rbf_proj(edge_rbf)  # [E, 3d]
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

    ``forward`` returns raw (normalised) ``energy [S]``, ``forces [N, 3]``, ``atom_energy [N]``
    and, on request, ``node`` = final scalar features ``x [N, d]`` and ``vector`` = final vector
    features ``vec [N, 3, d]`` (both are computed anyway, so asking costs nothing).

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
            from kdcache.models.checkpoint import apply_scale_file

            apply_scale_file(self, scale_file)

    # --- graph ----------------------------------------------------------------------------------
    def build_graph(self, batch, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """The symmetric PaiNN graph: ``src``, ``dst`` [E], ``dist`` [E] and ``edge_dir`` [E, 3]
        (unit vector from target to source), differentiable in ``pos``."""
        src, dst, dist, edge_vector = student_graph(
            batch, pos, self.cutoff, self.max_neighbors, self.use_pbc, symmetric=True
        )
        return {"src": src, "dst": dst, "dist": dist, "edge_dir": -edge_vector}

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, batch, features: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        wanted = self.check_features(features)
        gradient_forces = self.regress_forces and not self.direct_forces
        outer_grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(outer_grad or gradient_forces):
            pos = batch[K.POSITIONS]
            if gradient_forces and not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            z = batch[K.ATOMIC_NUMBERS].long()
            graph = self.build_graph(batch, pos)
            src, dst = graph["src"], graph["dst"]
            edge_rbf = self.radial_basis(graph["dist"])
            edge_dir = graph["edge_dir"]

            x = self.atom_emb(z)
            vec = x.new_zeros(x.shape[0], 3, x.shape[1])
            for i in range(self.num_layers):
                dx, dvec = self.message_layers[i](x, vec, src, dst, edge_rbf, edge_dir)
                x = (x + dx) * self.inv_sqrt_2
                vec = vec + dvec
                dx, dvec = self.update_layers[i](x, vec)
                x = getattr(self, f"upd_out_scalar_scale_{i}")(x + dx)
                vec = vec + dvec

            atom_energy = self.out_energy(x)[:, 0]
            n_struct = batch[K.NATOMS].shape[0]
            energy = atom_energy.new_zeros(n_struct).index_add_(0, _batch_index(batch, x.shape[0]), atom_energy)
            out = {K.ENERGY: energy, K.ATOM_ENERGY: atom_energy}
            if self.regress_forces:
                if self.direct_forces:
                    out[K.FORCES] = self.out_forces(x, vec)
                else:
                    # -dE/dpos. (The reference differentiates the sum of the node features
                    # instead, which is not a force; we use the physical definition.)
                    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=outer_grad)
                    out[K.FORCES] = -grad
        if K.NODE in wanted:
            out[K.NODE] = x
        if K.VECTOR in wanted:
            out[K.VECTOR] = vec
        if not outer_grad:
            out = {k: v.detach() for k, v in out.items()}
        return out


# ---------------------------------------------------------------------------------------------
# graph helpers shared by the students (PaiNN, SchNet)
# ---------------------------------------------------------------------------------------------


def student_graph(batch, pos: torch.Tensor, cutoff: float, max_neighbors: int, use_pbc: bool, symmetric: bool):
    """The radius graph PaiNN and SchNet use, built with :mod:`kdcache.graph`.

    At most ``max_neighbors`` nearest neighbours per target atom (strict, as the reference
    models' graph generation), periodic images where ``use_pbc`` and the structure's ``pbc``
    allow. ``symmetric``: keep one direction of every pair and add its reverse, PaiNN's rule
    (for an atom's own images, the reference applies the rule to the un-negated offsets, hence
    ``keep_self_image="positive"``).

    Args:
        batch: PyG ``Data``/``Batch`` with ``natoms`` and, for periodic structures, ``cell`` and
            ``pbc`` (without ``pbc``, directions with a non-zero lattice vector are periodic).
        pos: ``[N, 3]`` positions to use (may require grad; the graph itself does not).

    Returns:
        ``src [E]``, ``dst [E]``, ``distance [E]`` and ``edge_vector [E, 3]`` (kdcache sign: unit
        vector from the source image to the target), differentiable in ``pos``.
    """
    from kdcache import graph as G

    natoms = batch[K.NATOMS].view(-1).to(pos.device)
    n_struct = natoms.shape[0]
    cell = batch[K.CELL] if K.CELL in batch and batch[K.CELL] is not None else None
    cell = pos.new_zeros(n_struct, 3, 3) if cell is None else cell.reshape(n_struct, 3, 3).to(pos)
    pbc = batch[K.PBC] if K.PBC in batch and batch[K.PBC] is not None else None
    if pbc is None:
        pbc = cell.detach().abs().sum(dim=-1) > 0
    pbc = pbc.to(device=pos.device, dtype=torch.bool).reshape(n_struct, 3)
    if not use_pbc:
        pbc = torch.zeros_like(pbc)
    bidx = _batch_index(batch, pos.shape[0])
    edge_index, offset, _ = G.radius_graph_pbc(
        pos, cell, pbc, natoms, cutoff, max_neighbors, enforce_max_neighbors_strictly=True
    )
    if symmetric:
        sym = G.symmetrize_edges(edge_index, offset, bidx, n_struct, keep_self_image="positive")
        edge_index, offset = sym.edge_index, sym.cell_offset
    distance, edge_vector = G.edge_geometry(pos, cell, bidx, edge_index, offset)
    return edge_index[0], edge_index[1], distance, edge_vector


def _batch_index(batch, n_atoms: int) -> torch.Tensor:
    """Structure index of each atom (all zeros for a single un-batched structure)."""
    b = batch[K.BATCH] if K.BATCH in batch and batch[K.BATCH] is not None else None
    if b is None:
        return torch.zeros(n_atoms, dtype=torch.long, device=batch[K.POSITIONS].device)
    return b
