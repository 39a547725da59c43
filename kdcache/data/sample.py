"""From raw attributes (OC20 field names, ASE values) to a validated kdcache sample.

Every dataset ends here, so every dataset checks the same things and names the file, the
global sample index and the field when something is wrong.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

from kdcache import keys as K
from kdcache.errors import DataError

MAX_Z = 118

# Source names of each field, first match wins (OC20 S2EF files use y/force; fairchem's newer
# AtomsToGraphs writes energy/forces).
ENERGY_NAMES = ("y", "energy")
FORCE_NAMES = ("force", "forces")


class Sample(Data):
    """A kdcache sample: a PyG ``Data`` that batches ``sample_index`` unchanged.

    PyG offsets every attribute whose name contains ``"index"`` by the number of nodes when
    batching (meant for ``edge_index``); ``sample_index`` is a dataset index and must stay as is.
    """

    def __inc__(self, key, value, *args, **kwargs):
        if key == K.SAMPLE_INDEX:
            return 0
        return super().__inc__(key, value, *args, **kwargs)


def _array(value: Any, path, index, field) -> np.ndarray:
    try:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)
    except Exception as exc:
        raise DataError(path, index, field, f"cannot read as an array ({exc})") from None


def _scalar(value: Any, path, index, field) -> float:
    arr = _array(value, path, index, field)
    if arr.size != 1:
        raise DataError(path, index, field, f"expected one value, got shape {list(arr.shape)}")
    try:
        return float(arr.reshape(()))
    except (TypeError, ValueError):
        raise DataError(path, index, field, f"not a number: {value!r}") from None


def _finite(arr: np.ndarray, path, index, field) -> None:
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise DataError(path, index, field, f"{bad} value(s) are NaN or infinite")


def _int_id(value: Any) -> int | None:
    """An OC20 ``sid``/``fid`` as int; strings such as ``random1234`` give their trailing digits."""
    if isinstance(value, str):
        m = re.search(r"(\d+)$", value)
        return int(m.group(1)) if m else None
    try:
        arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
            return None
        v = arr.reshape(()).item()
        return int(v) if float(v).is_integer() else None
    except Exception:
        return None


def make_sample(attrs: dict[str, Any], path, index: int) -> Sample:
    """Validate raw attributes and build a kdcache sample.

    Args:
        attrs: raw fields, OC20 names (``pos``, ``atomic_numbers``, ``cell``, ``natoms``,
            ``tags``, ``fixed``, ``y``/``energy``, ``force``/``forces``, ``sid``, ``fid``,
            optionally ``pbc``). Tensors, numpy arrays or Python numbers.
        path: file the sample came from (for errors).
        index: global sample index; stored as ``sample_index``.

    Returns:
        :class:`Sample` with kdcache keys: pos [N,3] float32, atomic_numbers [N] long, cell [1,3,3],
        pbc [1,3] bool, natoms [1], tags [N] long, fixed [N] bool, energy [1] (if labelled),
        forces [N,3] (if labelled), sid/fid [1] (if known), sample_index [1].

    Raises:
        DataError: naming file, index and field.
    """
    for field in (K.POSITIONS, K.ATOMIC_NUMBERS, K.CELL):
        if field not in attrs:
            raise DataError(path, index, field, "missing")
    pos = _positions(attrs[K.POSITIONS], path, index)
    n = pos.shape[0]
    z = _atomic_numbers(attrs[K.ATOMIC_NUMBERS], n, path, index)
    cell, pbc = _cell_and_pbc(attrs, path, index)
    if K.NATOMS in attrs:
        natoms = _scalar(attrs[K.NATOMS], path, index, K.NATOMS)
        if natoms != n:
            raise DataError(path, index, K.NATOMS, f"says {natoms:g} atoms but pos has {n}")
    out: dict[str, torch.Tensor] = {
        K.POSITIONS: torch.from_numpy(np.ascontiguousarray(pos, dtype=np.float32)),
        K.ATOMIC_NUMBERS: torch.from_numpy(z),
        K.CELL: torch.from_numpy(cell.astype(np.float32)),
        K.PBC: torch.from_numpy(pbc.reshape(1, 3).copy()),
        K.NATOMS: torch.tensor([n], dtype=torch.long),
    }
    for field, dtype in ((K.TAGS, np.int64), (K.FIXED, bool)):
        out[field] = _per_atom_flags(attrs, field, dtype, n, path, index)
    out.update(_labels(attrs, n, path, index))
    for field in (K.SID, K.FID):
        if field in attrs:
            v = _int_id(attrs[field])
            if v is not None:
                out[field] = torch.tensor([v], dtype=torch.long)
    out[K.SAMPLE_INDEX] = torch.tensor([index], dtype=torch.long)
    return Sample(**out)


def _positions(value: Any, path, index) -> np.ndarray:
    """Positions ``[N, 3]``: numeric, finite, at least one atom."""
    pos = _array(value, path, index, K.POSITIONS)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise DataError(path, index, K.POSITIONS, f"expected shape [N, 3], got {list(pos.shape)}")
    if pos.shape[0] == 0:
        raise DataError(path, index, K.POSITIONS, "empty structure (no atoms)")
    if not np.issubdtype(pos.dtype, np.number):
        raise DataError(path, index, K.POSITIONS, f"not numeric (dtype {pos.dtype})")
    _finite(pos, path, index, K.POSITIONS)
    return pos


def _atomic_numbers(value: Any, n: int, path, index) -> np.ndarray:
    """Atomic numbers ``[N]`` as int64: one per atom, each a known element."""
    z = _array(value, path, index, K.ATOMIC_NUMBERS).reshape(-1)
    if z.shape[0] != n:
        raise DataError(path, index, K.ATOMIC_NUMBERS, f"has {z.shape[0]} entries for {n} atoms")
    if not np.issubdtype(z.dtype, np.number):
        raise DataError(path, index, K.ATOMIC_NUMBERS, f"not numeric (dtype {z.dtype})")
    zf = z.astype(np.float64)  # OC20 files store them as floats
    bad = ~np.isfinite(zf) | (zf != np.round(zf)) | (zf < 1) | (zf > MAX_Z)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(path, index, K.ATOMIC_NUMBERS, f"unknown element {z[i]!r} at atom {i} (expected an integer 1..{MAX_Z})")
    return np.round(zf).astype(np.int64)


def _cell_and_pbc(attrs: dict[str, Any], path, index) -> tuple[np.ndarray, np.ndarray]:
    """The cell ``[1, 3, 3]`` (float64) and periodic flags ``[3]`` (given, or from the cell)."""
    cell = _array(attrs[K.CELL], path, index, K.CELL)
    if cell.size != 9:
        raise DataError(path, index, K.CELL, f"expected 3x3 values, got shape {list(cell.shape)}")
    cell = cell.reshape(1, 3, 3).astype(np.float64)
    _finite(cell, path, index, K.CELL)
    if "pbc" in attrs:
        pbc = _array(attrs["pbc"], path, index, K.PBC).reshape(-1)
        if pbc.size == 1:
            pbc = np.repeat(pbc, 3)
        if pbc.size != 3:
            raise DataError(path, index, K.PBC, f"expected 3 flags, got {pbc.size}")
        pbc = pbc.astype(bool)
    else:
        # OC20 files carry no pbc; their cells are full and periodic in all directions.
        pbc = np.abs(cell[0]).sum(axis=1) > 0
    if (pbc & (np.abs(cell[0]).sum(axis=1) == 0)).any():
        raise DataError(path, index, K.CELL, "periodic direction with a zero lattice vector")
    return cell, pbc


def _per_atom_flags(attrs: dict[str, Any], field: str, dtype, n: int, path, index) -> torch.Tensor:
    """``tags`` (int64) or ``fixed`` (bool), one per atom; zeros where the file has none."""
    if field not in attrs:
        return torch.zeros(n, dtype=torch.long if dtype is np.int64 else torch.bool)
    arr = _array(attrs[field], path, index, field).reshape(-1)
    if arr.shape[0] != n:
        raise DataError(path, index, field, f"has {arr.shape[0]} entries for {n} atoms")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(path, index, field, f"not numeric (dtype {arr.dtype})")
    _finite(arr.astype(np.float64), path, index, field)
    return torch.from_numpy(arr.astype(dtype))


def _labels(attrs: dict[str, Any], n: int, path, index) -> dict[str, torch.Tensor]:
    """``energy [1]`` and ``forces [N, 3]`` where the sample is labelled (first source name wins)."""
    out = {}
    e_name = next((k for k in ENERGY_NAMES if k in attrs), None)
    if e_name is not None:
        energy = _scalar(attrs[e_name], path, index, K.ENERGY)
        if not math.isfinite(energy):
            raise DataError(path, index, K.ENERGY, f"energy is {energy}")
        out[K.ENERGY] = torch.tensor([energy], dtype=torch.float32)
    f_name = next((k for k in FORCE_NAMES if k in attrs), None)
    if f_name is not None:
        forces = _array(attrs[f_name], path, index, K.FORCES)
        if forces.shape != (n, 3):
            raise DataError(path, index, K.FORCES, f"expected shape [{n}, 3], got {list(forces.shape)}")
        if not np.issubdtype(forces.dtype, np.number):
            raise DataError(path, index, K.FORCES, f"not numeric (dtype {forces.dtype})")
        _finite(forces, path, index, K.FORCES)
        out[K.FORCES] = torch.from_numpy(np.ascontiguousarray(forces, dtype=np.float32))
    return out


def checked_atom_counts(dataset, counts: np.ndarray, progress: bool = False) -> np.ndarray:
    """Atom counts of a dataset's first ``len(counts)`` samples, as int64: entries below zero
    (unknown) are found by decoding the sample; a count of zero decodes it too, so that the
    sample's own error says what is wrong (an empty structure).

    Args:
        dataset: the dataset (``dataset[i]`` decodes sample ``i``).
        counts: ``[n]`` atoms per sample, ``-1`` where not recorded.
        progress: show a bar while samples are decoded.
    """
    counts = np.asarray(counts, dtype=np.int64).copy()
    todo = np.flatnonzero(counts <= 0)
    it = todo.tolist()
    if progress and len(todo) > 1:
        from tqdm import tqdm

        it = tqdm(it, desc="planning", unit="sample", file=sys.stderr, mininterval=1.0)
    for i in it:
        counts[i] = int(dataset[i][K.POSITIONS].shape[0])
    return counts


def sample_hash(data) -> int:
    """64-bit hash of a structure: atomic numbers (int64) + positions (float64) + cell (float64).

    Returned as a signed int64 value (blake2b, 8 bytes, little endian) so it fits a torch
    ``int64`` tensor; stage-one stores it to check that features join the right sample.
    """
    h = hashlib.blake2b(digest_size=8)
    z = data[K.ATOMIC_NUMBERS].detach().cpu().to(torch.int64).contiguous().numpy()
    pos = data[K.POSITIONS].detach().cpu().to(torch.float64).contiguous().numpy()
    cell = data[K.CELL].detach().cpu().to(torch.float64).reshape(-1).contiguous().numpy()
    for arr in (z, pos, cell):
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)
