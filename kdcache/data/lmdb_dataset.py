"""OC20 S2EF LMDB datasets: one ``.lmdb`` file or a folder of them, one global index."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import lmdb
import numpy as np
from torch.utils.data import Dataset

from kdcache.data.lmdb_writer import NATOMS_KEY
from kdcache.data.safe_pickle import attributes_of, safe_loads
from kdcache.data.sample import checked_atom_counts, make_sample
from kdcache.errors import DataError

LENGTH_KEY = b"length"


def lmdb_files(path) -> list[Path]:
    """The LMDB files a path stands for: the file itself or a folder's sorted ``*.lmdb``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.lmdb") if p.is_file())
        if not files:
            raise DataError(path, None, None, "folder holds no *.lmdb files")
        return files
    if not path.exists():
        raise DataError(path, None, None, "no such file or folder")
    return [path]


# One environment per file and process: py-lmdb refuses to open a file twice in a process,
# and several datasets (train/val, info, a store check) may name the same file.
_ENVS: dict[str, tuple[tuple, lmdb.Environment]] = {}
_ENVS_PID: int | None = None


def shared_env(path: Path) -> lmdb.Environment:
    """This process's read-only environment of ``path`` (opened on first use)."""
    global _ENVS_PID
    pid = os.getpid()
    if _ENVS_PID != pid:
        # Forked child: the parent's handles must not be used here; open our own.
        _ENVS.clear()
        _ENVS_PID = pid
    key = os.path.realpath(path)
    try:
        st = os.stat(key)
    except OSError:
        raise DataError(path, None, None, "no such file") from None
    # A file rewritten under the same name (e.g. demo data regenerated) must not be served
    # from the old mapping.
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _ENVS.get(key)
    if cached is not None and cached[0] == ident:
        return cached[1]
    if cached is not None:
        cached[1].close()
        del _ENVS[key]
    env = _open_env(Path(path))
    _ENVS[key] = (ident, env)
    return env


def _open_env(path: Path) -> lmdb.Environment:
    """Open read-only, without locks (the files live on shared/read-only storage)."""
    try:
        env = lmdb.open(
            str(path), subdir=False, readonly=True, lock=False, readahead=False,
            meminit=False,
        )
    except lmdb.Error as exc:
        raise DataError(path, None, None, f"not a readable LMDB ({exc})") from None
    # A truncated file still opens, but touching pages past its end would kill the process
    # with SIGBUS; compare the size the LMDB claims with the size on disk first.
    try:
        info, stat = env.info(), env.stat()
    except lmdb.Error as exc:
        env.close()
        raise DataError(path, None, None, f"corrupt LMDB ({exc})") from None
    needed = (info["last_pgno"] + 1) * stat["psize"]
    actual = os.path.getsize(path)
    if actual < needed:
        env.close()
        raise DataError(path, None, None, f"truncated LMDB: {actual} bytes on disk, {needed} expected")
    return env


class LmdbDataset(Dataset):
    """OC20-format LMDB dataset (values are pickled PyG ``Data``, keys ASCII integers).

    Items are kdcache samples (see :func:`kdcache.data.sample.make_sample`) whose
    ``sample_index`` is the global index over all files (files in sorted name order).
    Environments are opened lazily in each process, so the dataset can be handed to
    ``DataLoader`` workers (fork or spawn).

    Args:
        path: an ``.lmdb`` file or a folder of ``*.lmdb`` files.
    """

    kind = "lmdb"

    def __init__(self, path):
        self.path = Path(path)
        self.paths = lmdb_files(self.path)
        self._lengths = []
        for file in self.paths:
            self._lengths.append(self._length(shared_env(file), file))
        self._offsets = [0]
        for n in self._lengths:
            self._offsets.append(self._offsets[-1] + n)

    @staticmethod
    def _length(env: lmdb.Environment, file: Path) -> int:
        try:
            with env.begin() as txn:
                raw = txn.get(LENGTH_KEY)
                if raw is None:
                    # No length key (allowed): every entry is a sample.
                    return int(env.stat()["entries"])
        except lmdb.Error as exc:
            raise DataError(file, None, "length", f"corrupt LMDB ({exc})") from None
        value = safe_loads(raw, file, None)
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise DataError(file, None, "length", f"length key holds {value!r}, not an integer") from None
        if n < 0:
            raise DataError(file, None, "length", f"negative length {n}")
        return n

    def __len__(self) -> int:
        return self._offsets[-1]

    def _env(self, i: int) -> lmdb.Environment:
        # Environments live in a per-process table, never on the dataset, so the dataset
        # pickles to spawn workers and forked workers open their own handles.
        return shared_env(self.paths[i])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, key within that file) of a global index."""
        f = bisect.bisect_right(self._offsets, index) - 1
        return f, index - self._offsets[f]

    def file_of(self, index: int) -> Path:
        """The ``.lmdb`` file that holds global index ``index`` (errors name it)."""
        return self.paths[self.locate(self._check_index(index))[0]]

    def raw(self, index: int) -> dict:
        """The raw attribute dictionary stored under a global index (OC20 field names)."""
        index = self._check_index(index)
        f, key = self.locate(index)
        file = self.paths[f]
        try:
            with self._env(f).begin() as txn:
                payload = txn.get(str(key).encode("ascii"))
        except lmdb.Error as exc:
            raise DataError(file, index, None, f"corrupt LMDB ({exc})") from None
        if payload is None:
            raise DataError(file, index, None, f"key {key!r} missing (truncated LMDB or wrong length key?)")
        return attributes_of(safe_loads(payload, file, index), file, index)

    def _check_index(self, index) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        return index

    def __getitem__(self, index):
        index = self._check_index(index)
        with np.errstate(over="ignore"):  # float32 overflow: refused, naming the sample, when batched
            return make_sample(self.raw(index), self.file_of(index), index)

    def atom_counts(self, n: int | None = None, progress: bool = False) -> np.ndarray:
        """Atoms of the first ``n`` samples (all by default), as int64: read from each file's
        atom counts where :func:`~kdcache.data.lmdb_writer.write_lmdb` recorded them, found by
        decoding the samples of a file without (Open Catalyst's own LMDBs).

        Args:
            n: how many samples.
            progress: show a bar while samples are decoded.

        Raises:
            DataError: a file whose recorded counts do not cover its samples.
        """
        n = len(self) if n is None else max(0, min(int(n), len(self)))
        counts = np.full(n, -1, dtype=np.int64)  # -1: decode
        for f, file in enumerate(self.paths):
            lo, hi = self._offsets[f], min(self._offsets[f + 1], n)
            if lo >= hi:
                break
            try:
                with self._env(f).begin() as txn:
                    raw = txn.get(NATOMS_KEY)
            except lmdb.Error as exc:
                raise DataError(file, None, None, f"corrupt LMDB ({exc})") from None
            if raw is None:
                continue
            recorded = np.frombuffer(raw, dtype="<i8")
            if len(recorded) != self._lengths[f]:
                raise DataError(file, None, NATOMS_KEY.decode(), f"records {len(recorded)} atom counts for "
                                f"{self._lengths[f]} samples")
            counts[lo:hi] = recorded[: hi - lo]
        return checked_atom_counts(self, counts, progress)

    def fingerprint(self) -> dict:
        """Cheap identity: kind, file names and sizes, sample count (no pass over samples)."""
        return {
            "kind": self.kind,
            "files": [{"name": p.name, "size": p.stat().st_size, "num_samples": n}
                      for p, n in zip(self.paths, self._lengths)],
            "num_samples": len(self),
        }

    def __repr__(self) -> str:
        return f"LmdbDataset({str(self.path)!r}, files={len(self.paths)}, samples={len(self)})"

