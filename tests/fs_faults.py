"""Simulated file-system failures for in-process command tests.

The tests run as root, where ``chmod`` does not stop writes, and mounting a small or read-only
file system is not allowed everywhere; so the Python-level entry points that open and write files
(``open``/``io.open``, ``os.open``, ``os.mkdir``) are wrapped instead, for paths under one folder
only. The failures look like the real ones: a read-only file system refuses to create or open for
writing (``EROFS`` with the path); a full disk accepts writes until it is full and then fails a
``write()`` with ``ENOSPC`` and no path, leaving the file half-written.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _path_of(file) -> str | None:
    if isinstance(file, int):  # os.fdopen / mkstemp: the descriptor's path
        try:
            return os.readlink(f"/proc/self/fd/{file}")
        except OSError:
            return None
    if isinstance(file, (str, bytes, os.PathLike)):
        return os.path.abspath(os.fsdecode(file))
    return None


class _Disk:
    """What has been written under ``root`` so far, and what the fault allows."""

    def __init__(self, root: Path, err: int, capacity: int):
        self.root, self.err, self.left = str(Path(root).resolve()), err, capacity

    def covers(self, path: str | None) -> bool:
        return path is not None and (path == self.root or path.startswith(self.root + os.sep))

    def refuse(self, path: str) -> OSError:
        return OSError(self.err, os.strerror(self.err), path)


class _FillingFile:
    """A file on a disk with ``disk.left`` bytes free: a write past them writes what fits, then
    fails as ``write()`` does on a full disk."""

    def __init__(self, f, disk: _Disk):
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._disk.left:
            fits = self._disk.left
            if fits:
                self._f.write(data[:fits] if isinstance(data, str) else memoryview(data).cast("B")[:fits])
            self._disk.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def fail_writes(monkeypatch, root: str | os.PathLike, err: int, capacity: int = 0) -> None:
    """Make the file system under ``root`` fail writes with ``err``.

    Args:
        monkeypatch: pytest's fixture (undone at the end of the test, or by ``monkeypatch.undo()``).
        root: the folder (need not exist) standing for the failing file system.
        err: ``errno.EROFS`` (nothing may be created or opened for writing) or ``errno.ENOSPC``
            (full once ``capacity`` bytes have been written through Python file objects).
        capacity: bytes that still fit (ENOSPC only).
    """
    disk = _Disk(Path(root), err, capacity)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        path = _path_of(file)
        writing = any(c in mode for c in "wax+")
        if writing and disk.covers(path):
            if err != errno.ENOSPC:
                raise disk.refuse(path)
            return _FillingFile(real_open(file, mode, *args, **kwargs), disk)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and err != errno.ENOSPC and disk.covers(_path_of(path)):
            raise disk.refuse(_path_of(path))
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if err != errno.ENOSPC and disk.covers(_path_of(path)) and not os.path.exists(path):
            raise disk.refuse(_path_of(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
