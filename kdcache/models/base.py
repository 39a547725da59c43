"""The one model contract every teacher and student follows.

``forward(batch, features=...)`` returns a dict in *raw* (normalised) units, exactly like the
reference implementations; :meth:`PotentialModel.predict` returns physical units (eV, eV/Å)
through the model's :class:`Normalizer`. Hidden features are computed only when asked for.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from kdcache import keys as K


#: rows of the per-element reference table (row Z is element Z; row 0 unused)
NUM_ELEMENTS = 119


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


class PotentialModel(nn.Module):
    """Base class of GemNet-OC, PaiNN and SchNet.

    Subclasses implement :meth:`forward` and set :attr:`name` (the registry name) and
    :attr:`config` (the constructor arguments, enough to rebuild the model from a checkpoint).

    ``forward(batch, features)`` returns at least ``energy [S]``, ``forces [N, 3]`` and
    ``atom_energy [N]`` in raw units, plus each requested key of :data:`kdcache.keys.FEATURE_KEYS`
    that the architecture has (``node``; ``vector`` for PaiNN; ``edge``, ``edge_index``,
    ``edge_vector``, ``e2n``, ``e2v`` for models with edge features). A request for a feature the
    architecture lacks raises ``ValueError``.
    """

    name: str = "base"
    #: features this architecture can hand out
    available_features: tuple[str, ...] = (K.NODE,)

    def __init__(self) -> None:
        super().__init__()
        self.config: dict = {}
        self.normalizer = Normalizer()

    def check_features(self, features: Iterable[str]) -> frozenset[str]:
        wanted = frozenset(features)
        missing = wanted - set(self.available_features)
        if missing:
            raise ValueError(
                f"model {self.name!r} has no feature(s) {sorted(missing)}; it offers {list(self.available_features)}"
            )
        return wanted

    def forward(self, batch, features: Iterable[str] = ()) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    # --- physical units ---------------------------------------------------------------------
    def predict(self, batch, features: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Forward, then energies/forces/per-atom energies in eV and eV/Å (features untouched)."""
        out = dict(self(batch, features))
        natoms = batch[K.NATOMS]
        atom_ref, ref_sum = self.normalizer.batch_reference(batch)
        if ref_sum is not None:
            ref_sum = ref_sum.reshape(out[K.ENERGY].shape)
        out[K.ENERGY] = self.normalizer.denorm_energy(out[K.ENERGY], ref_sum)
        out[K.FORCES] = self.normalizer.denorm_forces(out[K.FORCES])
        if K.ATOM_ENERGY in out:
            per_atom_n = natoms[batch[K.BATCH]] if K.BATCH in batch else natoms.expand(out[K.ATOM_ENERGY].shape[0])
            out[K.ATOM_ENERGY] = self.normalizer.denorm_atom_energy(out[K.ATOM_ENERGY], per_atom_n, atom_ref)
        return out

    def predict_energy(self, batch) -> torch.Tensor:
        return self.predict(batch)[K.ENERGY]

    def predict_forces(self, batch) -> torch.Tensor:
        return self.predict(batch)[K.FORCES]

    def ase_calculator(self, device: str | torch.device | None = None):
        """An ASE calculator that runs this model (energies in eV, forces in eV/Å)."""
        from kdcache.calculator import KDCacheCalculator

        return KDCacheCalculator(self, device=device)
