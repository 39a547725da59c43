"""Process-group helpers shared by both stages: ``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK;
without it there is one process and every helper is a no-op.

One home for the set-up, so that extraction (:mod:`kdcache.store.extract`) and training
(:mod:`kdcache.train.trainer`) pick devices and join the process group the same way: each process
selects ``cuda:LOCAL_RANK`` *before* the first collective, as NCCL requires (otherwise every rank
of a node talks through GPU 0).
"""

from __future__ import annotations

import datetime as _dt
import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment (0, 1, 0 when absent)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(requested: str | None) -> torch.device:
    """The requested device, else this process's GPU when there is one, else CPU.

    Args:
        requested: ``cpu``, ``cuda``, ``cuda:1`` ... or None. A bare ``cuda`` means this
            process's GPU (``LOCAL_RANK`` modulo the visible GPUs), not GPU 0 for every rank.
    """
    _, _, local = env_world()
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", local % torch.cuda.device_count())
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def setup(device: torch.device, timeout: _dt.timedelta | None = None) -> tuple[int, int]:
    """Join the process group when started by torchrun (NCCL on GPUs, gloo on CPU).

    Args:
        device: this process's device (from :func:`pick_device`); a CUDA device becomes the
            current device before the group is initialised.
        timeout: collective timeout (torch's default when None). Extraction passes hours: rank 0
            waits at the end for the slowest rank's last groups.

    Returns:
        (rank, world size).
    """
    rank, world, _ = env_world()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds each process to its own GPU
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kwargs)
    return rank, world


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0_result(fn, what: str):
    """``fn()`` computed on rank 0 only and handed to every rank (``fn()`` itself in a single
    process): one collective, which every rank reaches whatever rank 0 finds. A failure on rank 0
    is raised there and, named, on the other ranks, so that none waits for a rank that gave up.

    Args:
        fn: the work, without arguments; its result must pickle.
        what: what it does, for the other ranks' message (``"decide the fast path"``).
    """
    if not is_distributed():
        return fn()
    box: dict = {"result": None, "error": None}
    failure = None
    if dist.get_rank() == 0:
        try:
            box["result"] = fn()
        except Exception as exc:  # handed on, then raised here too
            failure = exc
            box["error"] = f"{type(exc).__name__}: {exc}"
    box = broadcast_object(box)
    if failure is not None:
        raise failure
    if box["error"]:
        from kdcache.errors import KDCacheError

        raise KDCacheError(f"rank 0 could not {what}: {box['error']}")
    return box["result"]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
