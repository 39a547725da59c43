"""SchNet (Schütt et al. 2017) in the Open Catalyst configuration.

Continuous-filter convolutions on a periodic radius graph (at most 50 nearest neighbours per atom,
strict, as the reference wrapper fixes it), a two-layer per-atom output network and a sum over
atoms; forces are ``-dE/dpos``. Parameter names follow torch_geometric's SchNet, which the
reference wraps, so Open Catalyst checkpoints load key for key. As there, each interaction's
filter network is one module reachable under two names (``mlp`` and ``conv.nn``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcache import keys as K
from kdcache.models.base import ModelInputs, PotentialModel
from kdcache.models.fast_auto import STUDENT_PAYOFF
from kdcache.models.common import EDGE_PAIR, PAIR_EDGE, student_edges, student_geometry, with_edge_pairs
from kdcache.models.radial import GaussianBasis

#: the reference wrapper fixes the neighbour limit to this value
SCHNET_MAX_NEIGHBORS = 50
#: graph key: ``[N]`` atoms in each atom's structure (``readout="mean"`` only)
_STRUCTURE_SIZE = "structure_size"
#: graph key of the compiled inference path: the residual stream folded into its readers,
#: ``(table [100, C], S_0, ..., S_{K-1})`` of :func:`fold_residual_stream`
FOLDED = "folded_residual_stream"


class ShiftedSoftplus(nn.Module):
    """softplus(x) - log 2, zero at x = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = math.log(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x) - self.shift


class CFConv(nn.Module):
    """Continuous-filter convolution: t receives Σ_s lin1(h_s) ⊙ W(d_st) · cos-cutoff(d_st).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        num_filters: filter channels.
        filter_net: module mapping ``[E, num_gaussians] -> [E, num_filters]``.
        cutoff: radius of the cosine cutoff (Å).
    """

    def __init__(self, in_channels: int, out_channels: int, num_filters: int, filter_net: nn.Module, cutoff: float):
        super().__init__()
        self.lin1 = nn.Linear(in_channels, num_filters, bias=False)
        self.lin2 = nn.Linear(num_filters, out_channels)
        self.nn = filter_net
        self.cutoff = cutoff
        nn.init.xavier_uniform_(self.lin1.weight)
        nn.init.xavier_uniform_(self.lin2.weight)
        nn.init.zeros_(self.lin2.bias)

    def forward(self, h, src, dst, dist, dist_basis, edge_pair=None, projected: bool = False):
        """``dist`` and ``dist_basis`` per edge, or per atom pair with ``edge_pair [E]`` (the fast
        path's :func:`~kdcache.models.common.with_edge_pairs`: the filter once per pair).
        ``projected``: ``h`` is already ``lin1(h)`` (:func:`fold_residual_stream`'s path)."""
        envelope = 0.5 * (torch.cos(dist * (math.pi / self.cutoff)) + 1.0)
        w = self.nn(dist_basis) * envelope[:, None]
        if edge_pair is not None:
            w = w[edge_pair]
        msg = (h if projected else self.lin1(h))[src] * w
        agg = msg.new_zeros(h.shape[0], msg.shape[1]).index_add_(0, dst, msg)
        return self.lin2(agg)


class InteractionBlock(nn.Module):
    """One SchNet interaction: CFConv -> shifted softplus -> linear (the residual is outside).

    Args:
        hidden_channels: atom feature channels.
        num_gaussians: distance basis size.
        num_filters: filter channels.
        cutoff: cutoff radius (Å).
    """

    def __init__(self, hidden_channels: int, num_gaussians: int, num_filters: int, cutoff: float):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(num_gaussians, num_filters), ShiftedSoftplus(), nn.Linear(num_filters, num_filters)
        )
        self.conv = CFConv(hidden_channels, hidden_channels, num_filters, self.mlp, cutoff)
        self.act = ShiftedSoftplus()
        self.lin = nn.Linear(hidden_channels, hidden_channels)
        for layer in (self.mlp[0], self.mlp[2], self.lin):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h, src, dst, dist, dist_basis, edge_pair=None):
        return self.lin(self.act(self.conv(h, src, dst, dist, dist_basis, edge_pair)))


def fold_residual_stream(model: "SchNet") -> tuple[torch.Tensor, ...]:
    """SchNet's weights with the atom features ``h`` folded away: what the compiled inference
    path multiplies by instead (:meth:`SchNet.fast_inference_weights`).

    Why this works: ``h`` is a residual stream that only linear maps write and read. With
    ``h_0 = E[z]`` (the embedding), interaction ``k`` adds ``a_k Wl_kᵀ + bl_k`` (``a_k`` the
    shifted softplus after its ``conv.lin2``, ``Wl_k`` its ``lin``) and reads ``h_k`` only as
    ``x_k = h_k W1_kᵀ`` (its ``conv.lin1``, no bias); the head reads the last ``h`` only as
    ``p = h W1oᵀ + b1o`` (its ``lin1``). So

        x_k = T_k[z] + Σ_{m<k} a_m (W1_k Wl_m)ᵀ,    p = T_o[z] + Σ_m a_m (W1o Wl_m)ᵀ,

    with per-element tables ``T`` (the embedding and the biases pushed through ``W1_k``, ``W1o``).
    Each ``a_m`` is multiplied once, by ``S_m`` = the products ``W1_k Wl_m`` for every later
    ``k`` and ``W1o Wl_m`` stacked, and added to the columns of what it feeds. For OC20's SchNet
    (1024 channels, 256 filters, 5 interactions) that is 5.2 M multiply-adds per atom instead of
    7.1 M, with as many fewer weight reads, in the forward and again in the forces' backward:
    the products by 1024-wide weights were most of an MD step on a small molecule. The results
    agree with the unfolded model to float32 round-off (the products are formed in float64).

    Args:
        model: a SchNet (any width; :meth:`SchNet.folding_pays` says whether it is worth it).

    Returns:
        ``(table, S_0, ..., S_{K-1})`` in the model's dtype and device: ``table [100, C]`` with
        columns ``[x_0 | x_1 | ... | x_{K-1} | p]`` (``C = K·filters + channels/2``), and
        ``S_m [(K-1-m)·filters + channels/2, channels]`` for the columns from ``x_{m+1}`` on.
    """
    device, dtype = model.embedding.weight.device, model.embedding.weight.dtype
    # float64 where the device has it (MPS has not: the CPU forms it there)
    where = torch.device("cpu") if device.type == "mps" else device

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(where, torch.float64)

    blocks = model.interactions
    readers = [wide(b.conv.lin1.weight) for b in blocks[1:]] + [wide(model.lin1.weight)]  # x_1.., p
    writers = [wide(b.lin.weight) for b in blocks]
    written_bias = torch.stack([wide(b.lin.bias) for b in blocks]).cumsum(0)  # Σ_{m<=k} bl_m
    embedding = wide(model.embedding.weight)
    tables = [embedding @ wide(blocks[0].conv.lin1.weight).T]
    for k, reader in enumerate(readers):  # reads h_{k+1} = E[z] + Σ_{m<=k} (a_m Wl_mᵀ + bl_m)
        tables.append((embedding + written_bias[k]) @ reader.T)
    tables[-1] = tables[-1] + wide(model.lin1.bias)
    table = torch.cat(tables, dim=1).to(device, dtype)
    stacks = [torch.cat([reader @ writer for reader in readers[m:]]).to(device, dtype) for m, writer in enumerate(writers)]
    return (table, *stacks)


class SchNet(PotentialModel):
    """SchNet with the Open Catalyst constructor arguments and state-dict layout.

    ``forward`` returns raw ``energy [S]``, ``forces [N, 3]`` (= -dE/dpos), ``atom_energy [N]`` and,
    on request, ``node`` = atom features after the last interaction ``[N, hidden_channels]``.

    Args:
        use_pbc: periodic images in the graph (where the structure's ``pbc`` says so).
        use_pbc_single: accepted for config compatibility.
        regress_forces: predict forces (by differentiating the energy).
        otf_graph: accepted for config compatibility (graphs are always built on the fly).
        hidden_channels: atom feature channels.
        num_filters: continuous-filter channels.
        num_interactions: interaction blocks.
        num_gaussians: Gaussians of the distance expansion on [0, cutoff].
        cutoff: graph and filter cutoff (Å).
        readout: ``"sum"`` (extensive energy) or ``"mean"``.
    """

    name = "schnet"
    available_features = (K.NODE,)
    fast_payoff = STUDENT_PAYOFF  # what `fast: auto` weighs (kdcache.models.fast_auto)
    # Inductor inlines a cheap pointwise result into each kernel that reads it, and on the CPU it
    # realises a shared one only when it holds exp/log/tanh or more ops than this threshold (30 by
    # default). The edge lengths (a square root per pair) were thus recomputed, in scalar code, in
    # every 16-channel chunk of the per-edge message kernels. Threshold 4 makes them a buffer (the
    # cosine cutoff stays inlined): 1.02-1.11x per inference (slab and molecule, 1 and 2
    # threads); PaiNN got slower with it (0.86-0.96x), so it is SchNet's alone.
    fast_inductor_options = {"realize_opcount_threshold": 4}

    def __init__(
        self,
        use_pbc: bool = True,
        use_pbc_single: bool = False,
        regress_forces: bool = True,
        otf_graph: bool = False,
        hidden_channels: int = 128,
        num_filters: int = 128,
        num_interactions: int = 6,
        num_gaussians: int = 50,
        cutoff: float = 10.0,
        readout: str = "sum",
    ) -> None:
        super().__init__()
        if readout not in ("sum", "mean"):
            raise ValueError(f"readout must be 'sum' or 'mean', not {readout!r}")
        self.config = dict(
            use_pbc=use_pbc,
            use_pbc_single=use_pbc_single,
            regress_forces=regress_forces,
            otf_graph=otf_graph,
            hidden_channels=hidden_channels,
            num_filters=num_filters,
            num_interactions=num_interactions,
            num_gaussians=num_gaussians,
            cutoff=float(cutoff),
            readout=readout,
        )
        self.use_pbc = use_pbc
        self.regress_forces = regress_forces
        self.cutoff = float(cutoff)
        self.readout = readout
        self.max_neighbors = SCHNET_MAX_NEIGHBORS
        self.hidden_channels = hidden_channels
        # forces are always -dE/dpos (the reference has no direct head)
        self.direct_forces = False

        # Element Z uses row Z (row 0 unused), 100 rows as in the reference.
        self.embedding = nn.Embedding(100, hidden_channels, padding_idx=0)
        self.max_atomic_number = self.embedding.num_embeddings - 1
        self.distance_expansion = GaussianBasis(0.0, self.cutoff, num_gaussians)
        # the kept fold of fast_inference_weights: one dict shared by the model and its views
        # (shallow copies, same parameters), so that forgetting it on one forgets it on all; a
        # deep copy (new parameters) gets a copy, whose key no longer matches
        self._fold_cache: dict = {}
        self.interactions = nn.ModuleList(
            InteractionBlock(hidden_channels, num_gaussians, num_filters, self.cutoff) for _ in range(num_interactions)
        )
        self.lin1 = nn.Linear(hidden_channels, hidden_channels // 2)
        self.act = ShiftedSoftplus()
        self.lin2 = nn.Linear(hidden_channels // 2, 1)
        for layer in (self.lin1, self.lin2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def make_graph(self, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        """The radius graph (:func:`kdcache.models.common.student_edges`, not symmetrised) and,
        for ``readout="mean"``, each atom's structure size (for :meth:`total_energy`)."""
        graph = student_edges(inputs, self.cutoff, self.max_neighbors, symmetric=False)
        if self.readout == "mean":
            natoms, batch = inputs.structures.natoms, inputs.structures.batch
            graph[_STRUCTURE_SIZE] = natoms[batch].to(inputs.pos.dtype)
        return graph

    def fast_graph(self, inputs: ModelInputs, graph: dict) -> dict:
        """The compiled path's graph: with atom pairs, so each filter network runs once per pair
        whose two directions are both edges (the neighbour limit leaves some single)."""
        return with_edge_pairs(inputs, graph)

    def folding_pays(self) -> bool:
        """Whether :func:`fold_residual_stream` needs fewer multiply-adds per atom than the
        products it replaces (OC20's SchNet: 5.2 M against 7.1 M; COLL's 128-channel one: no)."""
        k, h = len(self.interactions), self.hidden_channels
        if k == 0:
            return False
        f = self.interactions[0].conv.lin1.out_features
        folded = h * (f * k * (k - 1) // 2 + k * (h // 2))  # the stacks S_m (x_0 is a table lookup)
        unfolded = k * h * h + k * f * h + h * (h // 2)  # every lin and conv.lin1, the head's lin1
        return folded < unfolded

    def fast_inference_weights(self) -> dict:
        """The folded residual stream (:func:`fold_residual_stream`) where it pays
        (:meth:`folding_pays`), under :data:`FOLDED`, kept between calls.

        Formed again when a weight it comes from was written (``load_state_dict``, ``copy_``,
        the optimisers' default steps: torch counts those writes in each tensor's version) or
        moved, and after any call of the model or a view of it whose outputs are differentiated
        (a training step, so that a later evaluation never sees weights from before it). Torch
        does not count writes through ``param.data``, nor the steps of ``fused=True``
        optimisers: after such writes outside a training loop, call
        :meth:`forget_inference_weights` on the model or any view of it.
        """
        if not self.folding_pays():
            return {}
        sources = [self.embedding.weight, self.lin1.weight, self.lin1.bias]
        for block in self.interactions:
            sources += [block.conv.lin1.weight, block.lin.weight, block.lin.bias]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in sources)
        if self._fold_cache.get("key") != key:
            with torch.no_grad():
                self._fold_cache.update(key=key, folded=fold_residual_stream(self))
        return {FOLDED: self._fold_cache["folded"]}

    def forget_inference_weights(self) -> None:
        """Drop the kept fold (:meth:`fast_inference_weights`), for the model and all its views:
        the next compiled inference forms it again."""
        self._fold_cache.clear()

    def body(self, pos: torch.Tensor, atomic_numbers: torch.Tensor, graph: dict,
             wanted) -> dict[str, torch.Tensor]:
        """Atom energies and ``node`` = atom features after the last interaction (not with the
        compiled inference path's :data:`FOLDED` weights, which leave the features unformed).

        Args:
            pos: ``[N, 3]`` positions.
            atomic_numbers: ``[N]``.
            graph: from :meth:`make_graph` (or the fast path's :meth:`fast_graph`).
            wanted: requested features (``node`` is always returned; the base class picks).
        """
        src, dst, dist, _ = student_geometry(pos, graph)
        edge_pair = graph.get(EDGE_PAIR)  # the fast path's: filters once per atom pair
        if edge_pair is not None:
            dist = dist[graph[PAIR_EDGE]]
        basis = self.distance_expansion(dist)
        if FOLDED in graph:
            return self._folded_body(atomic_numbers, graph[FOLDED], src, dst, dist, basis, edge_pair)
        h = self.embedding(atomic_numbers)
        for block in self.interactions:
            h = h + block(h, src, dst, dist, basis, edge_pair)
        atom_energy = self.lin2(self.act(self.lin1(h)))[:, 0]
        return {K.ATOM_ENERGY: atom_energy, K.NODE: h}

    def _folded_body(self, atomic_numbers, folded, src, dst, dist, basis, edge_pair) -> dict[str, torch.Tensor]:
        """:meth:`body` on :func:`fold_residual_stream`'s weights: the same atom energies."""
        table, *stacks = folded
        filters = self.interactions[0].conv.lin1.out_features
        reads = table[atomic_numbers]  # [N, C]: x_k of each interaction to come, then the head's p
        for block, stack in zip(self.interactions, stacks):
            x, later = reads[:, :filters], reads[:, filters:]
            a = block.act(block.conv(x, src, dst, dist, basis, edge_pair, projected=True))
            reads = torch.addmm(later, a, stack.T)
        return {K.ATOM_ENERGY: self.lin2(self.act(reads))[:, 0]}

    # The two readouts below are one rule: the mean divides each structure's sum by its size.
    def structure_energy(self, atom_energy: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
        """Sum of the atom energies, divided by the atom count for ``readout="mean"`` (the atom
        energies themselves are not divided, as in the reference)."""
        energy = super().structure_energy(atom_energy, inputs)
        if self.readout == "mean":
            energy = energy / inputs.structures.natoms.to(energy.dtype)
        return energy

    def total_energy(self, atom_energy: torch.Tensor, graph: dict) -> torch.Tensor:
        """Σ of :meth:`structure_energy` over the structures, from per-atom tensors only."""
        if self.readout == "mean":
            return (atom_energy / graph[_STRUCTURE_SIZE]).sum()
        return atom_energy.sum()
