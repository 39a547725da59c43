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


class Normalizer(nn.Module):
    """Label normalisation of the reference training: raw = (E - mean) / std, F_raw = F / std.

    Args:
        energy_mean: mean of the training energies (eV).
        energy_std: std of the training energies (eV); also scales forces.
        forces_std: std used for forces (defaults to ``energy_std``, as OCP's ``grad_target``).
    """

    def __init__(self, energy_mean: float = 0.0, energy_std: float = 1.0, forces_std: float | None = None):
        super().__init__()
        self.register_buffer("energy_mean", torch.tensor(float(energy_mean), dtype=torch.float64))
        self.register_buffer("energy_std", torch.tensor(float(energy_std), dtype=torch.float64))
        fstd = energy_std if forces_std is None else forces_std
        self.register_buffer("forces_std", torch.tensor(float(fstd), dtype=torch.float64))

    # physical -> raw
    def norm_energy(self, energy: torch.Tensor) -> torch.Tensor:
        return (energy - self.energy_mean.to(energy.dtype)) / self.energy_std.to(energy.dtype)

    def norm_forces(self, forces: torch.Tensor) -> torch.Tensor:
        return forces / self.forces_std.to(forces.dtype)

    # raw -> physical
    def denorm_energy(self, energy: torch.Tensor) -> torch.Tensor:
        return energy * self.energy_std.to(energy.dtype) + self.energy_mean.to(energy.dtype)

    def denorm_forces(self, forces: torch.Tensor) -> torch.Tensor:
        return forces * self.forces_std.to(forces.dtype)

    def denorm_atom_energy(self, atom_energy: torch.Tensor, natoms_per_atom: torch.Tensor) -> torch.Tensor:
        """Per-atom energies that sum to the physical energy: std·raw + mean/natoms."""
        dt = atom_energy.dtype
        return atom_energy * self.energy_std.to(dt) + self.energy_mean.to(dt) / natoms_per_atom.to(dt)

    def as_dict(self) -> dict[str, float]:
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
        out[K.ENERGY] = self.normalizer.denorm_energy(out[K.ENERGY])
        out[K.FORCES] = self.normalizer.denorm_forces(out[K.FORCES])
        if K.ATOM_ENERGY in out:
            per_atom_n = natoms[batch[K.BATCH]] if K.BATCH in batch else natoms.expand(out[K.ATOM_ENERGY].shape[0])
            out[K.ATOM_ENERGY] = self.normalizer.denorm_atom_energy(out[K.ATOM_ENERGY], per_atom_n)
        return out

    def predict_energy(self, batch) -> torch.Tensor:
        return self.predict(batch)[K.ENERGY]

    def predict_forces(self, batch) -> torch.Tensor:
        return self.predict(batch)[K.FORCES]

    def ase_calculator(self, device: str | torch.device | None = None):
        """An ASE calculator that runs this model (energies in eV, forces in eV/Å)."""
        from kdcache.calculator import KDCacheCalculator

        return KDCacheCalculator(self, device=device)
