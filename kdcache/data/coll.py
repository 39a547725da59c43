"""Datasets read through ASE: COLL extended XYZ as published, and any extxyz / ASE db / traj.

COLL frames look like::

    3
    Properties=species:S:1:pos:R:3:forces:R:3 energy=-2079.86 atomization_energy=-9.31 pbc="F F F"
    O  0.0  0.0  0.1   0.1 0.2 0.3
    ...

The molecules are not periodic: cell zeros, pbc False. ``energy_key`` picks the target
(``"energy"`` or ``"atomization_energy"``). ASE moves ``energy``/``forces`` of an extxyz comment
line into a single-point calculator and leaves other keys in ``atoms.info``; both are searched.

All frames are read once at construction (extxyz cannot be indexed without a pass) and kept as
compact numpy records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from kdcache.data.sample import checked_atom_counts, make_sample
from kdcache.errors import DataError

XYZ_SUFFIXES = (".xyz", ".extxyz")
ASE_SUFFIXES = (".db", ".traj")
ENERGY_KEYS = ("energy", "atomization_energy")


def _calc_results(atoms) -> dict[str, Any]:
    calc = atoms.calc
    return dict(getattr(calc, "results", {}) or {}) if calc is not None else {}


def atoms_to_attrs(atoms, energy_key: str | None, path, index: int) -> dict[str, Any]:
    """Raw attributes (OC20 names) of one ASE ``Atoms``; see :func:`make_sample`.

    Args:
        atoms: the structure.
        energy_key: where the target energy is: a key of ``atoms.info`` or of the calculator
            results; ``None`` = ``"energy"`` when present, else unlabelled.
        path, index: for errors.
    """
    from ase.constraints import FixAtoms

    results = _calc_results(atoms)
    info = atoms.info
    attrs: dict[str, Any] = {
        "pos": np.asarray(atoms.get_positions(), dtype=np.float64),
        "atomic_numbers": atoms.get_atomic_numbers(),
        "cell": np.asarray(atoms.get_cell(), dtype=np.float64),
        "pbc": np.asarray(atoms.pbc, dtype=bool),
        "tags": atoms.get_tags(),
    }
    fixed = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    if "fixed" in atoms.arrays:
        fixed |= np.asarray(atoms.arrays["fixed"]).astype(bool).reshape(-1)
    attrs["fixed"] = fixed

    key = energy_key or "energy"
    if key in info:
        attrs["energy"] = info[key]
    elif key in results:
        attrs["energy"] = results[key]
    elif energy_key is not None:
        raise DataError(path, index, energy_key, f"energy key {energy_key!r} not in the frame "
                        f"(has {sorted(set(info) | set(results))})")
    if "forces" in results:
        attrs["forces"] = results["forces"]
    elif "forces" in atoms.arrays:
        attrs["forces"] = atoms.arrays["forces"]
    for field in ("sid", "fid"):
        if field in info:
            attrs[field] = info[field]
    return attrs


def _read_frames(path: Path) -> list:
    import ase.io

    try:
        if path.suffix == ".db":
            import ase.db

            with ase.db.connect(str(path)) as db:
                frames = []
                for row in db.select():
                    atoms = row.toatoms(add_additional_information=True)
                    # key_value_pairs (e.g. sid, fid) come back under info["key_value_pairs"].
                    atoms.info.update(atoms.info.pop("key_value_pairs", {}) or {})
                    frames.append(atoms)
                return frames
        fmt = "extxyz" if path.suffix in XYZ_SUFFIXES else None
        return list(ase.io.read(str(path), index=":", format=fmt))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, None, None, f"cannot read with ASE ({type(exc).__name__}: {exc})") from None


class AseDataset(Dataset):
    """Structures from a file ASE reads (extxyz, ASE db, trajectory), e.g. COLL.

    Args:
        path: the file.
        energy_key: target energy (COLL: ``"energy"`` or ``"atomization_energy"``; default
            ``"energy"`` when present).
    """

    kind = "ase"

    def __init__(self, path, energy_key: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, None, None, "no such file")
        self.paths = [self.path]
        self.energy_key = energy_key
        if type(self) is AseDataset:
            self.kind = {".db": "ase-db", ".traj": "traj"}.get(self.path.suffix, "extxyz")
        frames = _read_frames(self.path)
        # Convert now: errors show up at open, and the records are light numpy arrays.
        self._attrs = [atoms_to_attrs(a, energy_key, self.path, i) for i, a in enumerate(frames)]
        if not self._attrs:
            raise DataError(self.path, None, None, "holds no structures")
        # counted once: planning a store needs every size, and decoding a sample costs more
        self._natoms = np.array([len(a["pos"]) for a in self._attrs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._attrs)

    def __getitem__(self, index):
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        with np.errstate(over="ignore"):  # float32 overflow: refused, naming the sample, when batched
            return make_sample(self._attrs[index], self.path, index)

    def raw(self, index: int) -> dict:
        return self._attrs[index]

    def atom_counts(self, n: int | None = None, progress: bool = False) -> np.ndarray:
        """Atoms of the first ``n`` samples (all by default), as int64, without decoding them.

        Args:
            n: how many samples.
            progress: show a bar while samples are decoded (only an empty structure is, to
                name it).
        """
        n = len(self) if n is None else max(0, min(int(n), len(self)))
        return checked_atom_counts(self, self._natoms[:n], progress)

    def file_of(self, index: int) -> Path:
        """The file every sample comes from (errors name it)."""
        return self.path

    def fingerprint(self) -> dict:
        """Kind, file name and size, sample count, energy key."""
        return {
            "kind": self.kind,
            "files": [{"name": self.path.name, "size": self.path.stat().st_size, "num_samples": len(self)}],
            "num_samples": len(self),
            "energy_key": self.energy_key or "energy",
        }

    def __repr__(self) -> str:
        return f"AseDataset({str(self.path)!r}, samples={len(self)}, energy_key={self.energy_key!r})"


class CollDataset(AseDataset):
    """COLL extended XYZ; ``energy_key`` is ``"energy"`` (default) or ``"atomization_energy"``.

    Args:
        path: the ``.xyz``/``.extxyz`` file.
        energy_key: which comment-line energy is the target.
    """

    kind = "coll"

    def __init__(self, path, energy_key: str | None = None):
        energy_key = energy_key or "energy"
        if energy_key not in ENERGY_KEYS:
            raise DataError(path, None, "energy_key", f"COLL energy key must be one of {ENERGY_KEYS}, got {energy_key!r}")
        super().__init__(path, energy_key)
