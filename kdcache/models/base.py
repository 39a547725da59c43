"""The one model contract every teacher and student follows, owned by :class:`PotentialModel`.

``forward(batch, features=...)`` returns a dict in *raw* (normalised) units, exactly like the
reference implementations; :meth:`PotentialModel.predict` returns physical units (eV, eV/Å)
through the model's :class:`Normalizer`. Hidden features are computed only when asked for.

The base class does everything that is the same for every architecture: reading the batch
(positions in the model's precision, atomic numbers checked, cell/pbc/structure index through
:func:`kdcache.graph.batch_structures`), gradient modes, forces as ``-dE/dpos`` (or the
architecture's direct head), detaching, the feature hand-out and units. An architecture
implements its body in two parts: :meth:`PotentialModel.make_graph`, the data-dependent graph
work (radius graphs, symmetrisation, triplets: index tensors, and per-edge shifts that do not
depend on the positions), and :meth:`PotentialModel.body`, everything from the positions on. The
split is what the compiled path (:mod:`kdcache.models.fast`) compiles (the body, shapes dynamic)
and what molecular dynamics reuses (the graph, through a :class:`kdcache.graph.NeighborList`
carried by the batch under :data:`NEIGHBOR_LIST`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from kdcache import graph as G
from kdcache import keys as K
from kdcache.errors import DataError
from kdcache.models.fast_auto import FastPayoff


#: rows of the per-element reference table (row Z is element Z; row 0 unused)
NUM_ELEMENTS = 119
NEIGHBOR_LIST = K.NEIGHBOR_LIST


class Normalizer(nn.Module):
    """Label normalisation: raw = (E - Σ_i ref[Z_i] - mean) / std, F_raw = F / std.

    With the reference table at zero (the default, and what Open Catalyst checkpoints load as)
    this is exactly the reference training's normalisation. A fitted table (per-element
    reference energies, as schnetpack's atomref / nequip's per-species shifts) takes out the part
    of E that is linear in the composition, so the network learns only the residual.

    The energy methods take the composition's reference as an optional argument: ``ref_sum``
    ``[S]`` (Σ ref over each structure's atoms, from :meth:`reference_sum`) or ``atom_ref``
    ``[N]`` (ref of each atom, from :meth:`atom_reference`). Without it no reference is applied.

    Args:
        energy_mean: mean of the training (residual) energies (eV).
        energy_std: std of the training (residual) energies (eV); also scales forces.
        forces_std: std used for forces (defaults to ``energy_std``, as OCP's ``grad_target``).
        atom_ref: per-element reference energies, ``[119]`` indexed by Z (default zeros).
    """

    def __init__(self, energy_mean: float = 0.0, energy_std: float = 1.0, forces_std: float | None = None,
                 atom_ref=None):
        super().__init__()
        self.register_buffer("energy_mean", torch.tensor(float(energy_mean), dtype=torch.float64))
        self.register_buffer("energy_std", torch.tensor(float(energy_std), dtype=torch.float64))
        fstd = energy_std if forces_std is None else forces_std
        self.register_buffer("forces_std", torch.tensor(float(fstd), dtype=torch.float64))
        ref = torch.zeros(NUM_ELEMENTS, dtype=torch.float64)
        if atom_ref is not None:
            ref.copy_(torch.as_tensor(atom_ref, dtype=torch.float64).reshape(NUM_ELEMENTS))
        self.register_buffer("atom_ref", ref)

    # composition references
    def atom_reference(self, atomic_numbers: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ref[Z_i] of each atom, ``[N]``."""
        ref = self.atom_ref.to(atomic_numbers.device)[atomic_numbers.long()]
        return ref if dtype is None else ref.to(dtype)

    def reference_sum(self, atomic_numbers: torch.Tensor, batch_index: torch.Tensor | None, num_structures: int,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
        """Σ_i ref[Z_i] of each structure, ``[S]`` (``batch_index`` None: all atoms in one)."""
        per_atom = self.atom_reference(atomic_numbers)
        if batch_index is None:
            batch_index = torch.zeros_like(atomic_numbers, dtype=torch.long)
        out = torch.zeros(num_structures, dtype=per_atom.dtype, device=per_atom.device)
        out.index_add_(0, batch_index.long(), per_atom)
        return out if dtype is None else out.to(dtype)

    def batch_reference(self, batch, dtype: torch.dtype | None = None):
        """(per-atom ref ``[N]``, per-structure sum ``[S]``) of a batch (or a single sample);
        ``(None, None)`` when the batch carries no atomic numbers (nothing to refer to)."""
        if K.ATOMIC_NUMBERS not in batch:
            return None, None
        z = batch[K.ATOMIC_NUMBERS]
        idx = batch[K.BATCH] if K.BATCH in batch else None
        n = int(batch[K.NATOMS].reshape(-1).shape[0])
        return self.atom_reference(z, dtype), self.reference_sum(z, idx, n, dtype)

    # physical -> raw
    def norm_energy(self, energy: torch.Tensor, ref_sum: torch.Tensor | None = None) -> torch.Tensor:
        if ref_sum is not None:
            energy = energy - ref_sum.to(energy.dtype)
        return (energy - self.energy_mean.to(energy.dtype)) / self.energy_std.to(energy.dtype)

    def norm_forces(self, forces: torch.Tensor) -> torch.Tensor:
        return forces / self.forces_std.to(forces.dtype)

    def norm_atom_energy(self, atom_energy: torch.Tensor, natoms_per_atom: torch.Tensor,
                         atom_ref: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`denorm_atom_energy`: (e_i - ref[Z_i] - mean/natoms) / std."""
        dt = atom_energy.dtype
        if atom_ref is not None:
            atom_energy = atom_energy - atom_ref.to(dt)
        return (atom_energy - self.energy_mean.to(dt) / natoms_per_atom.to(dt)) / self.energy_std.to(dt)

    # raw -> physical
    def denorm_energy(self, energy: torch.Tensor, ref_sum: torch.Tensor | None = None) -> torch.Tensor:
        out = energy * self.energy_std.to(energy.dtype) + self.energy_mean.to(energy.dtype)
        return out if ref_sum is None else out + ref_sum.to(energy.dtype)

    def denorm_forces(self, forces: torch.Tensor) -> torch.Tensor:
        return forces * self.forces_std.to(forces.dtype)

    def denorm_atom_energy(self, atom_energy: torch.Tensor, natoms_per_atom: torch.Tensor,
                           atom_ref: torch.Tensor | None = None) -> torch.Tensor:
        """Per-atom energies that sum to the physical energy: std·raw + mean/natoms + ref[Z_i]."""
        dt = atom_energy.dtype
        out = atom_energy * self.energy_std.to(dt) + self.energy_mean.to(dt) / natoms_per_atom.to(dt)
        return out if atom_ref is None else out + atom_ref.to(dt)

    def as_dict(self) -> dict[str, float]:
        """The scalar statistics (the reference table travels in the state_dict as ``atom_ref``)."""
        return {
            "energy_mean": float(self.energy_mean),
            "energy_std": float(self.energy_std),
            "forces_std": float(self.forces_std),
        }


@dataclass(frozen=True)
class ModelInputs:
    """A batch as a model's body reads it, prepared once by :meth:`PotentialModel.prepare_inputs`.

    Attributes:
        data: the batch as given (for fields only some bodies read, e.g. ``tags``).
        pos: ``[N, 3]`` positions in the model's precision; requires grad for gradient forces.
        atomic_numbers: ``[N]`` long, checked against the model's element range.
        structures: cell ``[S, 3, 3]``, pbc ``[S, 3]``, natoms ``[S]`` and the structure of each
            atom ``[N]`` (:class:`kdcache.graph.Structures`; pbc already off where the model
            does not use it).
        neighbor_list: the batch's :class:`kdcache.graph.NeighborList`, if it carries one.
    """

    data: Any
    pos: torch.Tensor
    atomic_numbers: torch.Tensor
    structures: G.Structures
    neighbor_list: G.NeighborList | None = None

    def radius_graph(self, cutoff: float, max_neighbors: int | None, strict: bool = True):
        """:func:`kdcache.graph.radius_graph_pbc` of the batch (from the neighbour list when
        there is one: the same graph): ``edge_index [2, E]``, ``cell_offset [E, 3]``, ``neighbors [S]``.

        Args:
            cutoff: radius (Å).
            max_neighbors: neighbour limit per target atom (None: no limit).
            strict: cut exactly at the limit (``enforce_max_neighbors_strictly``).
        """
        cell, pbc, natoms, _ = self.structures
        build = G.radius_graph_pbc if self.neighbor_list is None else self.neighbor_list.radius_graph
        return build(self.pos, cell, pbc, natoms, cutoff, max_neighbors, strict)

    def derived(self, owner: object, key, build):
        """``build()``: work that depends on the tensors of ``key`` alone (and on what is fixed
        for a structure: cell, tags), reused by the batch's neighbour list while ``key`` is
        unchanged (:meth:`kdcache.graph.NeighborList.cached`); without a list, just ``build()``.

        Args:
            owner: whose work it is (the model).
            key: tensors, e.g. the edge sets a graph is derived from.
            build: computes it.
        """
        if self.neighbor_list is None:
            return build()
        return self.neighbor_list.cached(owner, key, build)

    @property
    def num_atoms(self) -> int:
        return self.pos.shape[0]

    @property
    def num_structures(self) -> int:
        return self.structures.natoms.shape[0]


class PotentialModel(nn.Module):
    """Base class of GemNet-OC, PaiNN and SchNet: owns the model contract.

    Subclasses set :attr:`name` (the registry name), :attr:`available_features`,
    :attr:`config` (the constructor arguments, enough to rebuild the model from a checkpoint),
    the switches :attr:`regress_forces`, :attr:`direct_forces`, :attr:`use_pbc` and
    :attr:`max_atomic_number`, and implement :meth:`make_graph` and :meth:`body` (or, for a
    body that cannot be split, :meth:`compute`; such a model has no compiled path).

    ``forward(batch, features)`` returns at least ``energy [S]``, ``atom_energy [N]`` and (with
    ``regress_forces``) ``forces [N, 3]`` in raw units, plus each requested key of
    :data:`kdcache.keys.FEATURE_KEYS` that the architecture has (``node``; ``vector`` for PaiNN;
    ``edge`` (with :data:`kdcache.keys.FEATURE_COMPANIONS`), ``e2n``, ``e2v`` for models with edge
    features). A request for a feature the architecture lacks raises ``ValueError``.

    Gradients: gradient forces are computed inside ``torch.no_grad()`` too (stage-one
    inference). The outputs keep their autograd graph, and gradient forces are built with
    ``create_graph``, exactly when the caller can differentiate them: gradients enabled and
    trainable weights, or positions / a cell that require grad (training; tests of
    ``-dE/dpos``). Otherwise they are detached, so no graph outlives the call.

    The compiled path: :func:`kdcache.models.fast.fast_model` returns a view of the model (same
    modules and weights) whose :attr:`fast_path` runs the forward instead.
    """

    name: str = "base"
    #: features this architecture can hand out
    available_features: tuple[str, ...] = (K.NODE,)
    #: forces at all; from a direct head (True) or as -dE/dpos (False)
    regress_forces: bool = True
    direct_forces: bool = False
    #: periodic images where a structure's ``pbc`` says so (False: every structure is a molecule)
    use_pbc: bool = True
    #: atomic numbers the element embedding covers are 1..max_atomic_number (None: unchecked)
    max_atomic_number: int | None = None

    #: set on the views :func:`kdcache.models.fast.fast_model` returns: runs :meth:`forward`
    fast_path = None
    #: the compiled path's generated kernels run on all of torch's threads (True) or on one
    #: (False: message passing by scatter-adds, which inductor makes atomic on more threads; see
    #: :data:`kdcache.models.fast.GENERATED_KERNEL_THREADS`)
    fast_kernels_threaded: bool = False
    #: inductor options of this architecture's compiled body, on top of the fast path's own
    #: (:class:`kdcache.models.fast.FastPath`); part of the compile-cache key
    fast_inductor_options: dict = {}
    #: what the compiled path was measured to give per mode (``inference``, ``training``), which
    #: ``fast: auto`` weighs against a run's eager time (:mod:`kdcache.models.fast_auto`); a mode
    #: left out is never turned on by ``auto``
    fast_payoff: dict[str, FastPayoff] = {}

    def __init__(self) -> None:
        super().__init__()
        self.config: dict = {}
        self.normalizer = Normalizer()

    @classmethod
    def splits_body(cls) -> bool:
        """Whether the architecture implements :meth:`make_graph` and :meth:`body` (what the
        compiled path of :mod:`kdcache.models.fast` runs), not :meth:`compute` alone."""
        return cls.body is not PotentialModel.body and cls.make_graph is not PotentialModel.make_graph

    # --- the body: what each architecture implements -----------------------------------------
    def make_graph(self, inputs: ModelInputs) -> dict:  # pragma: no cover
        """The architecture's graph of a prepared batch: everything :meth:`body` needs besides
        the positions and atomic numbers (index tensors, per-edge shifts from
        :func:`kdcache.graph.edge_shifts`, and the python ints that size padded tensors).

        Its values may depend on the positions only through which edges exist (distances are the
        body's): it is built outside the compiled region. Radius graphs come from
        :meth:`ModelInputs.radius_graph` (a neighbour list's, in MD), and work derived from edge
        sets alone goes through :meth:`ModelInputs.derived`, which MD steps reuse.

        Args:
            inputs: the prepared batch.
        """
        raise NotImplementedError(f"{type(self).__name__} implements compute() instead of make_graph()/body()")

    def body(self, pos: torch.Tensor, atomic_numbers: torch.Tensor, graph: dict,
             wanted: Iterable[str]) -> dict[str, torch.Tensor]:  # pragma: no cover
        """The architecture's computation from the positions on: edge geometry, message passing,
        outputs. Tensor code only, without host syncs (it is what the fast path compiles).

        Args:
            pos: ``[N, 3]`` positions (the ones forces are taken with respect to).
            atomic_numbers: ``[N]`` long.
            graph: from :meth:`make_graph`.
            wanted: the requested features (already checked against :attr:`available_features`).

        Returns:
            ``atom_energy [N]`` (raw units; summed per structure by :meth:`structure_energy`), ``forces``
            when :attr:`direct_forces`, and at least every key of ``wanted`` (and, for ``edge``,
            :data:`kdcache.keys.FEATURE_COMPANIONS`). Other keys are dropped.
        """
        raise NotImplementedError

    def fast_graph(self, inputs: ModelInputs, graph: dict) -> dict:
        """What the compiled path (:mod:`kdcache.models.fast`) adds to :meth:`make_graph`'s graph
        before it runs :meth:`body`: work-saving index tensors the eager path, the reference, does
        without (e.g. :func:`kdcache.models.common.with_edge_pairs`). The body gives the same values
        with or without them, to float32 round-off. Default: the graph as it is.

        Args:
            inputs: the prepared batch.
            graph: from :meth:`make_graph`.
        """
        return graph

    def fast_inference_weights(self) -> dict:
        """What the compiled path adds to the graph when nothing will differentiate the outputs
        and no feature is requested (MD, evaluation): weights derived from the parameters that
        do the same work in fewer operations, formed once and kept while the parameters are
        unchanged (SchNet: :func:`kdcache.models.schnet.fold_residual_stream`). The body gives
        the same energies and forces with them, to float32 round-off. Default: none.
        """
        return {}

    def forget_inference_weights(self) -> None:
        """Drop what :meth:`fast_inference_weights` keeps. Both paths call this before every
        call whose outputs are differentiated: a training step may follow, and it may change
        the weights in ways torch does not count (fused optimisers). Default: nothing kept."""

    def compute(self, inputs: ModelInputs, wanted: frozenset[str]) -> dict[str, torch.Tensor]:
        """The architecture's body on a prepared batch: :meth:`body` on :meth:`make_graph`.

        Args:
            inputs: the prepared batch (positions to differentiate by, structures).
            wanted: the requested features (already checked against :attr:`available_features`).

        Returns:
            what :meth:`body` returns.
        """
        return self.body(inputs.pos, inputs.atomic_numbers, self.make_graph(inputs), wanted)

    def total_energy(self, atom_energy: torch.Tensor, graph: dict) -> torch.Tensor:
        """Σ over structures of :meth:`structure_energy`, from the atom energies and the graph
        alone (no per-structure tensors): what the compiled path differentiates for gradient
        forces. The sum of the atom energies; a model whose structure energy is not their sum
        overrides both methods together."""
        return atom_energy.sum()

    def structure_energy(self, atom_energy: torch.Tensor, inputs: ModelInputs) -> torch.Tensor:
        """Structure energies ``[S]`` from atom energies ``[N]``: their sum (override for others)."""
        n = inputs.num_structures
        return atom_energy.new_zeros(n).index_add_(0, inputs.structures.batch, atom_energy)

    # --- the contract --------------------------------------------------------------------------
    @property
    def gradient_forces(self) -> bool:
        """Forces as -dE/dpos (by autograd, w.r.t. the positions)."""
        return self.regress_forces and not self.direct_forces

    def check_features(self, features: Iterable[str]) -> frozenset[str]:
        """The requested features as a set; ``ValueError`` for any the architecture lacks."""
        wanted = frozenset(features)
        missing = wanted - set(self.available_features)
        if missing:
            raise ValueError(
                f"model {self.name!r} has no feature(s) {sorted(missing)}; it offers {list(self.available_features)}"
            )
        return wanted

    def forward(self, batch, features: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Raw energies, forces and per-atom energies of a batch, and the requested features.

        Args:
            batch: PyG ``Data``/``Batch`` with ``pos``, ``atomic_numbers``, ``natoms`` and, as the
                architecture needs, ``cell``, ``pbc``, ``batch``, ``tags``.
            features: keys of :attr:`available_features` to return as well.
        """
        if self.fast_path is not None:
            return self.fast_path(self, batch, features)
        wanted = self.check_features(features)
        keep_graph = self._caller_differentiates(batch)
        if keep_graph:
            self.forget_inference_weights()  # a training step may follow (see the method)
        with torch.set_grad_enabled(torch.is_grad_enabled() or self.gradient_forces):
            inputs = self.prepare_inputs(batch)
            body = self.compute(inputs, wanted)
            out = self._outputs(inputs, body, wanted, keep_graph)
        if not keep_graph:
            out = {k: v.detach() for k, v in out.items()}
        return out

    def prepare_inputs(self, batch, autograd_forces: bool = True) -> ModelInputs:
        """Positions (model precision; a fresh leaf that requires grad for gradient forces,
        unless the caller's already does), checked atomic numbers, the structures and the
        batch's neighbour list (:data:`NEIGHBOR_LIST`).

        Args:
            batch: the batch.
            autograd_forces: make the positions require grad for gradient forces (False: the
                caller differentiates otherwise, as the compiled path does).
        """
        pos = batch[K.POSITIONS].to(self.param_dtype)
        if autograd_forces and self.gradient_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        z = batch[K.ATOMIC_NUMBERS].long()
        self._check_atomic_numbers(z)
        neighbor_list = batch[NEIGHBOR_LIST] if NEIGHBOR_LIST in batch else None
        return ModelInputs(batch, pos, z, G.batch_structures(batch, pos, self.use_pbc), neighbor_list)

    @property
    def param_dtype(self) -> torch.dtype:
        """Floating dtype of the weights (the precision inputs are converted to)."""
        first = next((p for p in self.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.get_default_dtype()

    def _caller_differentiates(self, batch) -> bool:
        if not torch.is_grad_enabled():
            return False
        if any(p.requires_grad for p in self.parameters()):
            return True
        return any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (batch[K.POSITIONS], batch[K.CELL] if K.CELL in batch else None)
        )

    def _check_atomic_numbers(self, z: torch.Tensor) -> None:
        # an embedding row that does not exist is an IndexError on the CPU and a device-side
        # assert (which ends the process's CUDA context) on a GPU; name the field instead
        top = self.max_atomic_number
        if top is None or z.numel() == 0:
            return
        lo, hi = int(z.min()), int(z.max())
        if lo < 1 or hi > top:
            raise DataError("<batch>", None, K.ATOMIC_NUMBERS, f"atomic numbers must lie in 1..{top}, got {lo}..{hi}")

    def _outputs(self, inputs: ModelInputs, body: dict, wanted: frozenset[str], keep_graph: bool) -> dict:
        """Energy by :meth:`structure_energy`, forces (direct or -dE/dpos) and the requested features."""
        atom_energy = body[K.ATOM_ENERGY]
        energy = self.structure_energy(atom_energy, inputs)
        out = {K.ENERGY: energy, K.ATOM_ENERGY: atom_energy}
        if self.regress_forces and K.FORCES in body:
            out[K.FORCES] = body[K.FORCES]  # a direct head, or gradient forces the compiled path took
        elif self.regress_forces:
            # -dE/dpos; the graph of the gradient is kept only for a caller that differentiates
            # the forces again (a force loss in training)
            (grad,) = torch.autograd.grad(energy.sum(), inputs.pos, create_graph=keep_graph)
            out[K.FORCES] = -grad
        for key in self.available_features:  # in a fixed order, whatever the request's order
            if key in wanted:
                for k in (key, *K.FEATURE_COMPANIONS.get(key, ())):
                    if k not in body:
                        raise RuntimeError(f"{type(self).__name__}.compute did not return the requested {k!r}")
                    out[k] = body[k]
        return out

    # --- physical units ---------------------------------------------------------------------
    def predict(self, batch, features: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Forward, then energies/forces/per-atom energies in eV and eV/Å (features untouched)."""
        out = dict(self(batch, features))
        natoms = batch[K.NATOMS]
        atom_ref, ref_sum = self.normalizer.batch_reference(batch)
        if ref_sum is not None:
            ref_sum = ref_sum.reshape(out[K.ENERGY].shape)
        out[K.ENERGY] = self.normalizer.denorm_energy(out[K.ENERGY], ref_sum)
        if K.FORCES in out:  # absent without regress_forces
            out[K.FORCES] = self.normalizer.denorm_forces(out[K.FORCES])
        if K.ATOM_ENERGY in out:
            per_atom_n = natoms[batch[K.BATCH]] if K.BATCH in batch else natoms.expand(out[K.ATOM_ENERGY].shape[0])
            out[K.ATOM_ENERGY] = self.normalizer.denorm_atom_energy(out[K.ATOM_ENERGY], per_atom_n, atom_ref)
        return out

    def predict_energy(self, batch) -> torch.Tensor:
        """Energies ``[S]`` in eV."""
        return self.predict(batch)[K.ENERGY]

    def predict_forces(self, batch) -> torch.Tensor:
        """Forces ``[N, 3]`` in eV/Å."""
        return self.predict(batch)[K.FORCES]

    def ase_calculator(self, device: str | torch.device | None = None, **options):
        """An ASE calculator that runs this model (energies in eV, forces in eV/Å).

        Args:
            device: where to run (default: where the weights are).
            **options: of :class:`kdcache.calculator.KDCacheCalculator` (``fast``, ``skin``, ...).
        """
        from kdcache.calculator import KDCacheCalculator  # lazy: ASE only for those who use it

        return KDCacheCalculator(self, device=device, **options)
