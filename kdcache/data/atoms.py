"""A kdcache sample as an ASE ``Atoms``: the structure a calculator teacher computes, and the
seed that candidate structures are made from.

The inverse of :func:`kdcache.data.coll.atoms_to_attrs`: positions, atomic numbers, cell, pbc,
tags, and ``FixAtoms`` for the atoms the sample marks fixed. Labels are not carried over.
"""

from __future__ import annotations

import numpy as np

from kdcache import keys as K


def sample_to_atoms(sample, constraints: bool = True):
    """The structure of a kdcache sample as an ASE ``Atoms`` (float64 copies of its values).

    Args:
        sample: a kdcache sample (:class:`kdcache.data.sample.Sample`).
        constraints: hold the sample's fixed atoms with ``FixAtoms``.

    Returns:
        ``ase.Atoms`` without a calculator.
    """
    from ase import Atoms
    from ase.constraints import FixAtoms

    n = int(sample[K.POSITIONS].shape[0])
    atoms = Atoms(
        numbers=sample[K.ATOMIC_NUMBERS].reshape(-1).cpu().numpy().astype(np.int64),
        positions=sample[K.POSITIONS].detach().cpu().double().numpy(),
        cell=sample[K.CELL].detach().cpu().double().reshape(3, 3).numpy(),
        pbc=sample[K.PBC].reshape(-1).cpu().numpy().astype(bool) if K.PBC in sample else False,
        tags=sample[K.TAGS].reshape(-1).cpu().numpy() if K.TAGS in sample else np.zeros(n, dtype=np.int64),
    )
    fixed = sample[K.FIXED].reshape(-1).cpu().numpy().astype(bool) if K.FIXED in sample else None
    if constraints and fixed is not None and fixed.any():
        atoms.set_constraint(FixAtoms(mask=fixed))
    return atoms
