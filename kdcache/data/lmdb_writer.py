"""Write OC20-format LMDBs: ASCII-int keys, pickled PyG ``Data`` values, a pickled ``length``.

Values are pickled the way the Open Catalyst preprocessing does (``pickle.dumps(Data,
protocol=-1)``), with two differences that do not change what a reader sees:

* tensor storages are serialised with a fixed storage key instead of a memory address, so the
  same records give bit-identical files (deterministic demo data);
* ``pyg1=True`` writes PyG 1.x-era objects: class ``torch_geometric.data.data.Data`` whose
  pickled state is the plain attribute dictionary (no ``_store``), as files made before PyG 2.

Files are written to a temporary name and renamed at the end, so a half-written LMDB never
appears under the final name.
"""

from __future__ import annotations

import collections
import copyreg
import errno
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Iterable

import lmdb
import numpy as np
import torch
import torch_geometric.data.data as pyg_data
from torch_geometric.data import Data

from kdcache import keys as K

#: where :func:`write_lmdb` keeps a file's ``metadata`` (beside ``length``, which OC20 readers
#: use for the sample count, so an extra key is not taken for a sample)
METADATA_KEY = b"kdcache_metadata"
#: where :func:`write_lmdb` keeps every record's atom count (little-endian int64, in key order),
#: so that a reader learns the sizes without unpickling each record (OC20's own files lack it)
NATOMS_KEY = b"kdcache_natoms"
#: PyG 1.x Data.__dict__ had these slots, ``None`` unless set.
_PYG1_SLOTS = ("x", "edge_index", "edge_attr", "y", "pos", "normal", "face")


class _Storage:
    """A tensor's data, pickled as ``torch.storage._load_from_bytes(legacy torch.save bytes)``."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def legacy_bytes(self) -> bytes:
        storage = torch.storage.TypedStorage(
            wrap_storage=self.tensor.untyped_storage(), dtype=self.tensor.dtype, _internal=True
        )
        buf = io.BytesIO()
        torch.save(storage, buf, _use_new_zipfile_serialization=False)
        raw = buf.getvalue()
        # torch names the storage by its memory address; use "0" so output is reproducible.
        # The legacy format is protocol-2 pickles (no frames), where a str is
        # b"X" + uint32 length + utf-8, so the swap is local.
        key = str(storage._cdata).encode()
        old = b"X" + struct.pack("<I", len(key)) + key
        new = b"X" + struct.pack("<I", 1) + b"0"
        if raw.count(old) != 2:  # persistent id + key list; anything else: keep torch's bytes
            return raw
        return raw.replace(old, new)


class _Pickler(pickle.Pickler):
    """Pickler with reproducible tensor storages and optional PyG 1.x-era Data objects."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.legacy: dict[int, dict] = {}  # id of a bare Data instance -> its PyG 1.x state

    def legacy_data(self, attrs: dict[str, Any]):
        # An uninitialised instance of the real class, so pickle records the class by its real
        # name; its state is the plain dict PyG 1.x kept in __dict__.
        obj = pyg_data.Data.__new__(pyg_data.Data)
        state = {slot: None for slot in _PYG1_SLOTS}
        state.update(attrs)
        state["__num_nodes__"] = None
        self.legacy[id(obj)] = state
        return obj

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().clone()
            return (torch._utils._rebuild_tensor_v2,
                    (_Storage(t), 0, tuple(t.shape), t.stride(), False, collections.OrderedDict()))
        if isinstance(obj, _Storage):
            return (torch.storage._load_from_bytes, (obj.legacy_bytes(),))
        if id(obj) in self.legacy:
            return (copyreg.__newobj__, (pyg_data.Data,), self.legacy[id(obj)])
        return NotImplemented


def dumps_record(record: dict[str, Any], pyg1: bool = False) -> bytes:
    """Pickle one record (OC20 field names) as a PyG ``Data`` (or PyG 1.x-era object)."""
    buf = io.BytesIO()
    pickler = _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    obj = pickler.legacy_data(record) if pyg1 else Data(**record)
    pickler.dump(obj)
    return buf.getvalue()


def sample_to_record(sample) -> dict[str, Any]:
    """A kdcache sample -> OC20 record: float atomic numbers, ``y``/``force``, int sid/fid."""
    n = int(sample[K.POSITIONS].shape[0])
    rec: dict[str, Any] = {
        "pos": sample[K.POSITIONS].float(),
        "cell": sample[K.CELL].reshape(1, 3, 3).float(),
        "atomic_numbers": sample[K.ATOMIC_NUMBERS].float(),
        "natoms": n,
        "tags": sample[K.TAGS].long() if K.TAGS in sample else torch.zeros(n, dtype=torch.long),
        "fixed": sample[K.FIXED].float() if K.FIXED in sample else torch.zeros(n),
    }
    pbc = sample[K.PBC].reshape(-1) if K.PBC in sample else None
    if pbc is not None and not bool(pbc.all()):
        # OC20 files carry no pbc (always periodic); keep it when the structure is not.
        rec["pbc"] = pbc.bool()
    for field in (K.SID, K.FID):
        if field in sample:
            rec[field] = int(sample[field].reshape(-1)[0])
    if K.ENERGY in sample:
        rec["y"] = float(sample[K.ENERGY].reshape(-1)[0])
    if K.FORCES in sample:
        rec["force"] = sample[K.FORCES].float()
    return rec


def atoms_to_record(atoms, energy: float | None = None, forces=None, sid=None, fid=None) -> dict[str, Any]:
    """An ASE ``Atoms`` -> OC20 record (tags from ``atoms.get_tags()``, fixed from FixAtoms)."""
    from ase.constraints import FixAtoms

    n = len(atoms)
    fixed = np.zeros(n, dtype=np.float32)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = 1.0
    rec: dict[str, Any] = {
        "pos": torch.tensor(atoms.get_positions(), dtype=torch.float32),
        "cell": torch.tensor(np.asarray(atoms.get_cell()), dtype=torch.float32).view(1, 3, 3),
        "atomic_numbers": torch.tensor(atoms.get_atomic_numbers(), dtype=torch.float32),
        "natoms": n,
        "tags": torch.tensor(atoms.get_tags(), dtype=torch.long),
        "fixed": torch.from_numpy(fixed),
    }
    if not atoms.pbc.all():
        rec["pbc"] = torch.tensor(atoms.pbc, dtype=torch.bool)
    if sid is not None:
        rec["sid"] = int(sid)
    if fid is not None:
        rec["fid"] = int(fid)
    if energy is not None:
        rec["y"] = float(energy)
    if forces is not None:
        rec["force"] = torch.tensor(np.asarray(forces), dtype=torch.float32)
    return rec


def _record_atoms(record: dict[str, Any]) -> int | None:
    """Atoms of a record: rows of its positions, or None when they are not ``[N, 3]``."""
    shape = tuple(np.shape(record.get("pos")))
    return int(shape[0]) if len(shape) == 2 and shape[1] == 3 else None


def write_lmdb(path, records: Iterable[dict[str, Any]], *, pyg1: bool = False,
               write_length: bool = True, progress=None, commit_every: int = 1000,
               metadata: dict[str, Any] | None = None) -> int:
    """Write records to an OC20-format LMDB file, atomically.

    Args:
        path: the ``.lmdb`` file to create (replaced if it exists).
        records: dicts with OC20 field names (see :func:`sample_to_record`). Written as given,
            without validation (tests write bad records on purpose).
        pyg1: write PyG 1.x-era pickles instead of PyG >= 2 ones.
        write_length: store the pickled ``length`` key (OC20 files have it) and the atom
            counts (:data:`NATOMS_KEY`, where every record has positions ``[N, 3]``).
        progress: optional callable ``progress(n)`` called after each record.
        commit_every: records per write transaction.
        metadata: plain data (dicts, lists, strings, numbers) kept under :data:`METADATA_KEY`;
            read after the last record, so a dict filled in while ``records`` is generated is
            written complete. Needs ``write_length`` (without it every entry counts as a sample).

    Returns:
        the number of records written.
    """
    path = Path(path)
    if metadata is not None and not write_length:
        raise ValueError("metadata needs write_length=True: readers would count its entry as a sample")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    map_size = 1 << 30
    env = None
    count = 0
    try:
        # meminit: zero unused page space, so equal records give byte-identical files.
        env = lmdb.open(str(tmp), subdir=False, map_size=map_size, lock=False, meminit=True)
        pending: list[tuple[bytes, bytes]] = []
        natoms: list[int | None] = []

        def flush():
            nonlocal map_size
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for k, v in pending:
                            txn.put(k, v)
                    break
                except lmdb.MapFullError:
                    map_size *= 2
                    env.set_mapsize(map_size)
            pending.clear()

        for rec in records:
            pending.append((str(count).encode("ascii"), dumps_record(rec, pyg1=pyg1)))
            natoms.append(_record_atoms(rec))
            count += 1
            if progress is not None:
                progress(1)
            if len(pending) >= commit_every:
                flush()
        if write_length:
            pending.append((b"length", pickle.dumps(count, protocol=pickle.HIGHEST_PROTOCOL)))
            if None not in natoms:  # raw bytes, not a pickle: read without unpickling anything
                pending.append((NATOMS_KEY, np.asarray(natoms, dtype="<i8").tobytes()))
        if metadata is not None:
            pending.append((METADATA_KEY, pickle.dumps(dict(metadata), protocol=pickle.HIGHEST_PROTOCOL)))
        flush()
        env.sync(True)
        env.close()
        os.replace(tmp, path)
    except BaseException as exc:
        if env is not None:
            env.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, lmdb.Error):
            raise _lmdb_os_error(exc, path) from exc
        raise
    return count


def _lmdb_os_error(exc: "lmdb.Error", path: Path) -> OSError:
    """An ``OSError`` naming ``path`` for a failed LMDB write.

    lmdb reports system errors as ``lmdb.Error("what: strerror")`` without an errno; finding the
    errno back from the text lets the command line say which file failed and why, like any other
    failed write. A full disk often shows as an I/O error at commit, so that case says so.

    Args:
        exc: the lmdb error.
        path: the LMDB file being written.
    """
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code), str(path))
    return OSError(errno.EIO, f"writing the LMDB failed ({text}; a full disk can show as this)", str(path))
