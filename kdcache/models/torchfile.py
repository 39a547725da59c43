"""Reading torch files as data, never as code: checkpoints, scale files, runs to resume.

Below every model module and :mod:`kdcache.models.checkpoint`, so a model that loads a scale
file in its constructor needs nothing from the checkpoint loader (which builds models).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from kdcache.errors import CheckpointError
from kdcache.fs import file_sha256  # noqa: F401  (re-exported: the checkpoint loader names files by it)


def read_checkpoint(path: str | os.PathLike, mmap: bool = False, what: str = "checkpoint") -> dict:
    """The contents of a torch file, read as data only: the one way kdcache opens a ``.pt`` a
    user names (checkpoints, scale files, runs to resume).

    ``weights_only=True`` makes torch refuse any pickled global outside tensors and plain
    containers, so a file that would run code when unpickled is an error instead.

    Args:
        path: the file.
        mmap: map the tensors' storage instead of reading it (cheap when only metadata such as
            the model name is wanted); ignored for old non-zip files, which cannot be mapped.
        what: what the file is, for messages.

    Returns:
        The top-level dict.

    Raises:
        CheckpointError: missing file, unreadable or code-carrying file, or not a dict at the top.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about any pickle protocol above 2 before refusing or reading
            # the file; the outcome (data or a named error) is all a user needs
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:
        raise CheckpointError(f"{what} {path}: cannot be read as a weights-only torch file ({_load_problem(exc)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what} {path}: expected a dict at the top level, found {type(ckpt).__name__}")
    return ckpt


def _load_problem(exc: Exception) -> str:
    """One line from torch's load error: the reason, without torch's advice.

    torch wraps the weights-only unpickler's own one-line reason (which it keeps as the
    exception's context) in paragraphs that advise ``weights_only=False`` or allowlisting
    globals, i.e. running the file's code, which kdcache never does: only the reason's first
    sentence is kept.

    Args:
        exc: what ``torch.load`` raised.

    Returns:
        The reason, e.g. ``"... refused it: Trying to load unsupported GLOBAL posix.system whose
        module posix is blocked; a checkpoint is data, never code"``.
    """
    refused = isinstance(exc, pickle.UnpicklingError) and isinstance(exc.__context__, pickle.UnpicklingError)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc.__context__ if refused else exc))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # the first sentence names the global or opcode; what follows is advice
    reason = re.split(r"(?<=\.)\s", first, maxsplit=1)[0].rstrip(".")
    if refused:
        return f"the weights-only unpickler refused it: {reason}; a checkpoint is data, never code"
    return f"{type(exc).__name__}: {reason}"


__all__ = ["file_sha256", "read_checkpoint"]


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes and bytes), independent of device."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
