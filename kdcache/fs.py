"""Output paths and file-system failures: what every writing command (``extract``, ``train``,
``data demo``, ``data convert``) checks and reports the same way.

A failed ``write()`` (full disk, quota) raises an ``OSError`` without a file name; inside
:func:`naming_output` it gets the output's path, so that the command line can say which output
failed (:func:`os_error_message`). Writers themselves write to a temporary name and rename, so a
failure never leaves a half-written file under a final name; re-running the command redoes or
resumes what was missing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import Iterator

from kdcache.errors import ConfigError


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (the identity of checkpoints and input files).

    Args:
        path: the file.
        chunk_size: bytes read at once.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()

#: errnos that mean "this could not be written" (rather than "could not be found/read")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_HINTS = {
    errno.ENOSPC: "free some space, then run the same command again",
    errno.EDQUOT: "free some space (disk quota), then run the same command again",
    errno.EROFS: "choose an output on a writable file system",
    errno.EACCES: "choose an output you may write to",
}


def ensure_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse an output folder that is an existing regular file (before any work is done).

    Args:
        path: the folder a command will create or fill.
        option: the command-line option that named it (for the message).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: an existing file is there, where a folder is needed; choose another path")
    return path


@contextlib.contextmanager
def naming_output(path: str | os.PathLike) -> Iterator[None]:
    """Give an ``OSError`` raised inside that names no file the output's ``path``.

    Args:
        path: the output (store, run folder, LMDB) being written.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def os_error_message(exc: OSError) -> str:
    """One line for a failed file-system operation: what failed, on which path, and what to do.

    Args:
        exc: the error (``filename``/``filename2`` name the paths when known).
    """
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        where = str(exc.filename) + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        verb = "cannot write " if exc.errno in _WRITE_ERRNOS else ""
        line = f"{verb}{where}: {reason}"
    else:
        line = reason
    hint = _HINTS.get(exc.errno)
    return f"{line} ({hint})" if hint else line
