"""Unpickling of OC20 LMDB values with an allow-list, so a crafted file cannot run code.

OC20 LMDB values are ``pickle.dumps(torch_geometric.data.Data, protocol=-1)``. Such a pickle
names only a handful of globals: the PyG ``Data`` class (and, for PyG >= 2, its storage and
attribute classes), torch's tensor-rebuilding functions with storages serialised by
``torch.storage._load_from_bytes``, numpy array reconstruction for numpy-valued attributes, and
``collections.OrderedDict`` (tensor backward hooks). Every other global is refused.

Two further precautions:

* PyG classes are never instantiated. They are replaced by :class:`PickledObject`, a record
  of the pickled state, so PyG 1.x pickles (attributes directly in ``__dict__``) and PyG >= 2
  pickles (attributes in ``_store._mapping``) load under any installed PyG version, and no
  ``__setstate__`` of a library class runs on untrusted state.
* ``torch.storage._load_from_bytes`` itself calls ``torch.load(..., weights_only=False)``; it is
  replaced by our decoder of those bytes (storage classes only), falling back to
  ``torch.load(..., weights_only=True)`` (torch's own restricted unpickler).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import functools
import io
import pickle
from typing import Any

import numpy as np
import torch

from kdcache.errors import DataError


class PickledObject:
    """Stand-in for a PyG class found in a pickle: records the class name and pickled state."""

    cls_name = "object"

    def __new__(cls, *args, **kwargs):  # accept NEWOBJ arguments, ignore them
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):  # PyG classes may be called with REDUCE
        self.state: Any = None
        if kwargs:
            self.state = dict(kwargs)

    def __setstate__(self, state):
        # BUILD may hand over (dict_state, slot_state); keep the dict part.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = state[0] if state[0] is not None else state[1]
        self.state = state

    def __repr__(self) -> str:
        return f"PickledObject({self.cls_name})"


def _stub(module: str, name: str) -> type:
    return type(name, (PickledObject,), {"cls_name": f"{module}.{name}", "__module__": __name__})


_PYG_CLASSES = {
    ("torch_geometric.data.data", "Data"),
    ("torch_geometric.data.data", "DataEdgeAttr"),
    ("torch_geometric.data.data", "DataTensorAttr"),
    ("torch_geometric.data.storage", "BaseStorage"),
    ("torch_geometric.data.storage", "GlobalStorage"),
    ("torch_geometric.data.storage", "NodeStorage"),
    ("torch_geometric.data.storage", "EdgeStorage"),
    ("torch_geometric.data", "Data"),
    ("torch_geometric.data.batch", "Batch"),
}
_STUBS = {key: _stub(*key) for key in _PYG_CLASSES}


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _LegacyUnpickler(pickle.Unpickler):
    """Reads the pickles inside torch's legacy storage format: storage classes only."""

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return _StorageRef(str(pid[2]), _STORAGE_DTYPES[pid[1]], int(pid[4]))


def _parse_legacy_storage(b: bytes):
    """Decode ``torch.save(storage, _use_new_zipfile_serialization=False)`` bytes ourselves.

    Layout: pickles of the magic number, the protocol version and system info; a pickle of the
    storage as a persistent id; a pickle of the storage keys; then per key an int64 element
    count and the raw data. About 10x faster than ``torch.load`` for these tiny payloads,
    which matters at thousands of samples per second.
    """
    f = io.BytesIO(b)
    if _LegacyUnpickler(f).load() != _LEGACY_MAGIC or _LegacyUnpickler(f).load() != _LEGACY_PROTOCOL:
        raise ValueError("not a legacy torch storage")
    sys_info = _LegacyUnpickler(f).load()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    ref = _LegacyUnpickler(f).load()
    keys = _LegacyUnpickler(f).load()
    if not isinstance(ref, _StorageRef) or keys != [ref.key]:
        raise ValueError("unexpected legacy storage layout")
    numel = int.from_bytes(f.read(8), "little" if little else "big", signed=True)
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    raw = f.read(numel * itemsize)
    if numel != ref.numel or len(raw) != numel * itemsize:
        raise ValueError("legacy storage data truncated")
    if numel == 0:
        data = torch.empty(0, dtype=ref.dtype)
    elif little or itemsize == 1:
        data = torch.frombuffer(bytearray(raw), dtype=ref.dtype)
    else:  # big-endian writer: let numpy swap bytes (bfloat16 never came from such machines)
        np_dtype = torch.empty((), dtype=ref.dtype).numpy().dtype.newbyteorder(">")
        data = torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).astype(np_dtype.newbyteorder("=")))
    return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=ref.dtype, _internal=True)


def _load_storage_from_bytes(b: bytes):
    """Safe replacement of ``torch.storage._load_from_bytes`` (which runs an unrestricted
    ``torch.load``): our own decoder, else torch's ``weights_only`` loader."""
    try:
        return _parse_legacy_storage(b)
    except _Refused:
        raise
    except Exception:
        return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 object pickles), limited to our stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject) and base is object):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r} is not allowed")
    return cls()


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("_codecs", "encode"): codecs.encode,  # protocol 2 spells bytes as encode(str, "latin1")
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
# numpy moved its internals from numpy.core to numpy._core (2.0); pickles name either.
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = None
    _ALLOWED[(_mod, "scalar")] = None
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = None
# Storage classes (torch.FloatStorage, ...) appear only inside the _load_from_bytes payload,
# which _LegacyUnpickler reads; calling them from the outer pickle is never needed.
for _name in ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"):
    _ALLOWED[("torch", _name)] = getattr(torch, _name)
_ALLOWED.update(_STUBS)


@functools.lru_cache(maxsize=None)
def _numpy_internal(module: str, name: str):
    """Resolve an allowed numpy internal by name in whichever numpy layout is installed."""
    import importlib

    # numpy >= 2 first (importing numpy.core there warns), then numpy 1.x.
    for mod in (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core")):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"{module}.{name} not found in this numpy")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocols < 3 use Python-2 names (copy_reg, __builtin__); map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key not in _ALLOWED:
            raise _Refused(f"{module}.{name}")
        obj = _ALLOWED[key]
        # None marks numpy internals, resolved in the installed numpy's layout.
        return _numpy_internal(module, name) if obj is None else obj

    def persistent_load(self, pid):  # plain pickles of OC20 data have no persistent ids
        raise pickle.UnpicklingError("persistent ids are not allowed")


class _Refused(pickle.UnpicklingError):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


def safe_loads(payload: bytes, path=None, index: int | None = None) -> Any:
    """Unpickle ``payload`` with the OC20 allow-list.

    Args:
        payload: the pickled bytes.
        path: file the bytes came from (for the error message).
        index: sample index (for the error message).

    Raises:
        DataError: the pickle names a class outside the allow-list, or is corrupt.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(payload)).load()
    except _Refused as exc:
        raise DataError(
            path, index, None,
            f"pickled value names {exc.qualname!r}, which is not in the allow-list of classes "
            "an OC20 LMDB holds (PyG Data, torch tensors, numpy arrays); refusing to load it",
        ) from None
    except Exception as exc:  # corrupt bytes raise all sorts of errors
        raise DataError(path, index, None, f"cannot unpickle value ({type(exc).__name__}: {exc})") from None


def attributes_of(obj: Any, path=None, index: int | None = None) -> dict[str, Any]:
    """The attribute dictionary of an unpickled PyG ``Data`` (PyG 1.x or >= 2) or plain dict.

    PyG >= 2 keeps attributes in ``_store`` (a ``GlobalStorage``) under ``_mapping``; PyG 1.x
    kept them directly in the object's ``__dict__`` next to bookkeeping entries such as
    ``__num_nodes__``. Entries that are ``None`` (unset PyG 1.x slots) are dropped.
    """
    if isinstance(obj, PickledObject):
        state = obj.state
        if not isinstance(state, dict):
            raise DataError(path, index, None, f"pickled {obj.cls_name} has no attribute dictionary")
        store = state.get("_store")
        if store is not None:
            mapping = store.state.get("_mapping") if isinstance(store, PickledObject) and isinstance(store.state, dict) else None
            if not isinstance(mapping, dict):
                raise DataError(path, index, None, "pickled PyG Data has a _store without _mapping")
            state = mapping
        return {k: v for k, v in state.items() if not k.startswith("_") and v is not None}
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if isinstance(k, str) and v is not None}
    name = type(obj).__name__
    raise DataError(path, index, None, f"value is {'an' if name[0] in 'aeiou' else 'a'} {name}, not a PyG Data object")
