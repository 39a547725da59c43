"""One writer at a time: an exclusive lock on a feature store.

The lock is ``flock`` on a small file *beside* the store (``.NAME.lock`` in the store's parent
folder), not inside it: it exists before the store does and survives ``--overwrite`` removing
the store folder. The kernel drops an ``flock`` when its holder exits, however it exits (``kill
-9`` included), so a dead writer's lock is reclaimed by the next run without any staleness
guess. The file records the holder (pid, host, start time, torchrun job) so that a refused writer
can name it.

Under ``torchrun`` only rank 0 takes the lock (see :mod:`kdcache.store.extract`): it holds it
from before the store is created or resumed until the store is finished, and the other ranks of
the job write their groups only after rank 0 has broadcast that it holds it. A second job is
refused by its own rank 0, and all its ranks stop.

``flock`` works on local file systems and, on Linux, on NFS (emulated with NFS byte-range
locks); on a file system without locking the error names the lock file.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from kdcache.errors import StoreError


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target`` (``dir/.NAME.lock`` for ``dir/NAME``)."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def _holder_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "job": os.environ.get("TORCHELASTIC_RUN_ID"),
        "command": " ".join(sys.argv)[:500],
    }


def read_holder(path: str | os.PathLike) -> dict | None:
    """The holder recorded in lock file ``path`` (None when absent, empty or unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def describe_holder(holder: dict | None) -> str:
    """``pid 123 on host h since 2025-01-01T00:00:00+00:00`` (or a fallback without details)."""
    if not holder:
        return "another process (it has not recorded itself yet)"
    job = f", torchrun job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}{job}"


class WriteLock:
    """An exclusive, non-blocking lock for writing ``target``.

    Args:
        target: the store (or any path) to be written; need not exist yet.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WriteLock":
        """Take the lock or raise :class:`StoreError` naming its holder. Re-entrant no-op when
        held already."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreError(f"cannot lock {self.path} (to write {self.target}): {exc.strerror}") from None
                raise StoreError(
                    f"{self.target} is being written by {describe_holder(read_holder(self.path))} "
                    f"(lock {self.path}); wait for it to finish or stop it, then run the command again"
                ) from None
            # A holder that releases unlinks the file while it still holds it: if ours was
            # unlinked (or replaced) between open and flock, we locked a file nobody else will
            # see; open the current one again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and remove its file (no-op when not held)."""
        if self._fd is None:
            return
        try:
            # unlink while still holding, so no one can lock the old file after we let go
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only parent by now: the lock itself goes with the descriptor
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriteLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
