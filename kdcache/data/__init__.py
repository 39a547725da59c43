"""Datasets as users have them: OC20 LMDBs, COLL extended XYZ, anything ASE reads.

``open_dataset(path)`` picks the reader; every dataset gives :class:`~kdcache.data.sample.Sample`
items with :mod:`kdcache.keys` fields (``sample_index`` = global index), ``fingerprint()``,
``atom_counts()`` (the sizes a store's layout needs, without decoding every sample where the
files allow) and ``paths``. :func:`collate` batches samples for either stage (checked; labels only where
required).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache import keys as K
from kdcache.data.batch import LABELS, collate, sample_file
from kdcache.data.coll import ASE_SUFFIXES, XYZ_SUFFIXES, AseDataset, CollDataset
from kdcache.data.demo import write_demo
from kdcache.data.lmdb_dataset import LmdbDataset
from kdcache.data.lmdb_writer import atoms_to_record, sample_to_record, write_lmdb
from kdcache.data.sample import Sample, make_sample, sample_hash
from kdcache.errors import DataError

__all__ = [
    "open_dataset", "dataset_statistics", "sample_hash", "make_sample", "Sample",
    "LmdbDataset", "AseDataset", "CollDataset", "write_lmdb", "sample_to_record", "atoms_to_record",
    "write_demo", "collate", "sample_file", "LABELS",
]


def open_dataset(path, energy_key: str | None = None):
    """Open a dataset by its path.

    Args:
        path: ``.lmdb`` file or folder of ``*.lmdb`` (OC20 format); ``.xyz``/``.extxyz``
            (COLL or any extended XYZ); ``.db`` (ASE database) or ``.traj`` (ASE trajectory).
        energy_key: for ASE-read files, the energy used as target (COLL: ``"energy"`` or
            ``"atomization_energy"``). Not used for LMDBs (their target is ``y``).

    Raises:
        DataError: unknown kind of path, or unreadable file.
    """
    p = Path(path)
    if p.is_dir() or p.suffix == ".lmdb":
        return LmdbDataset(p)
    if p.suffix in XYZ_SUFFIXES + ASE_SUFFIXES:
        return AseDataset(p, energy_key)
    if not p.exists():
        raise DataError(p, None, None, "no such file or folder")
    raise DataError(p, None, None, "unknown dataset kind (expected .lmdb, a folder of them, "
                    ".xyz/.extxyz, .db or .traj)")


def dataset_statistics(dataset, progress: bool = False, max_samples: int | None = None) -> dict:
    """What a dataset holds, from one pass over its samples.

    Args:
        dataset: any kdcache dataset.
        progress: show a progress bar.
        max_samples: look at the first this many samples only (``None``: all).

    Returns:
        dict with ``num_samples``, ``num_atoms`` (total), ``atoms_min/mean/max``, ``elements``
        (sorted atomic numbers), ``element_counts``, ``energy_mean/std/min/max`` (eV),
        ``energy_per_atom_mean``, ``force_rms`` (per component, eV/Å), ``force_max`` (max
        |F|), ``periodic`` (True/False/"mixed"), ``fixed_fraction``, ``labelled`` counts.
    """
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="reading samples", unit="sample")
    natoms, energies, e_per_atom = [], [], []
    counts: dict[int, int] = {}
    f_sq, f_n, f_max, f_samples = 0.0, 0, 0.0, 0
    periodic, fixed = set(), 0
    for i in it:
        s = dataset[i]
        na = int(s[K.NATOMS][0])
        natoms.append(na)
        z, c = np.unique(s[K.ATOMIC_NUMBERS].numpy(), return_counts=True)
        for zi, ci in zip(z.tolist(), c.tolist()):
            counts[zi] = counts.get(zi, 0) + ci
        if K.ENERGY in s:
            e = float(s[K.ENERGY][0])
            energies.append(e)
            e_per_atom.append(e / na)
        if K.FORCES in s:
            f = s[K.FORCES].double()
            f_sq += float((f * f).sum())
            f_n += f.numel()
            f_samples += 1
            f_max = max(f_max, float(f.norm(dim=1).max()))
        periodic.add(bool(s[K.PBC].any()))
        fixed += int(s[K.FIXED].sum())
    total = int(sum(natoms))
    e = np.asarray(energies, dtype=np.float64)

    def _f(x):
        return None if x is None else float(x)

    return {
        "num_samples": n,
        "num_atoms": total,
        "atoms_min": min(natoms) if natoms else 0,
        "atoms_mean": total / n if n else 0.0,
        "atoms_max": max(natoms) if natoms else 0,
        "elements": sorted(counts),
        "element_counts": {str(k): v for k, v in sorted(counts.items())},
        "energy_mean": _f(e.mean()) if e.size else None,
        "energy_std": _f(e.std()) if e.size else None,
        "energy_min": _f(e.min()) if e.size else None,
        "energy_max": _f(e.max()) if e.size else None,
        "energy_per_atom_mean": _f(np.mean(e_per_atom)) if e_per_atom else None,
        "force_rms": (f_sq / f_n) ** 0.5 if f_n else None,
        "force_max": f_max if f_n else None,
        "periodic": periodic.pop() if len(periodic) == 1 else ("mixed" if periodic else None),
        "fixed_fraction": fixed / total if total else 0.0,
        "labelled": {"energy": len(energies), "forces": f_samples},
    }
