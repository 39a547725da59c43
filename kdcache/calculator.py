"""An ASE calculator around any kdcache model (relaxations, molecular dynamics, quick checks)."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.constraints import FixAtoms
from torch_geometric.data import Batch, Data

from kdcache import keys as K
from kdcache.errors import DataError


def atoms_to_batch(atoms, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Batch:
    """One ASE ``Atoms`` as a one-structure kdcache batch.

    Keys: ``pos``, ``atomic_numbers``, ``cell [1, 3, 3]``, ``pbc [1, 3]``, ``natoms``, ``tags``,
    ``fixed`` (atoms held by a ``FixAtoms`` constraint) and ``batch``.

    Raises:
        DataError: non-finite positions or cell, or no atoms.
    """
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    cell = np.asarray(atoms.get_cell(), dtype=np.float64)
    where = getattr(atoms, "info", {}).get("source", "<ase.Atoms>")
    if len(atoms) == 0:
        raise DataError(where, None, K.POSITIONS, "the structure has no atoms")
    if not np.all(np.isfinite(pos)):
        raise DataError(where, None, K.POSITIONS, "positions contain NaN or infinite values")
    if not np.all(np.isfinite(cell)):
        raise DataError(where, None, K.CELL, "cell contains NaN or infinite values")
    fixed = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    data = Data(
        pos=torch.tensor(pos, dtype=dtype),
        atomic_numbers=torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long),
        cell=torch.tensor(cell, dtype=dtype).view(1, 3, 3),
        pbc=torch.tensor(np.asarray(atoms.pbc, dtype=bool)).view(1, 3),
        natoms=torch.tensor([len(atoms)], dtype=torch.long),
        tags=torch.tensor(atoms.get_tags(), dtype=torch.long),
        fixed=torch.tensor(fixed),
    )
    return Batch.from_data_list([data]).to(device)


class KDCacheCalculator(Calculator):
    """ASE calculator: energy (eV), free_energy (= energy) and forces (eV/Å) from ``model.predict``.

    The raw outputs go through the model's normaliser, so the numbers are physical. Forces are
    the model's (direct or gradient); atoms under ``FixAtoms`` get forces like any other atom, ASE
    applies the constraint.

    Args:
        model: a :class:`kdcache.models.base.PotentialModel` (put in eval mode).
        device: where to run (default: where the model's parameters are).
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model, device: str | torch.device | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        first = next(iter(model.parameters()), None)
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        batch = atoms_to_batch(self.atoms, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            out = self.model.predict(batch)
        energy = float(out[K.ENERGY].reshape(-1)[0])
        self.results = {"energy": energy, "free_energy": energy}
        if K.FORCES in out:
            self.results["forces"] = out[K.FORCES].detach().cpu().to(torch.float64).numpy().reshape(-1, 3)
