"""Process-wide runtime settings shared by every command."""

from __future__ import annotations

import os

import torch


def default_cpu_threads() -> int:
    """Half the cores, at least one.

    Why not all of them: data-loader workers, the store's writer thread and other jobs share the
    cores, and OpenMP threads that wait on a busy core make small matmuls an order of magnitude
    slower (measured ~40x on a shared 2-core machine). Half leaves room and costs little.
    """
    return max(1, (os.cpu_count() or 1) // 2)


def set_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else ``OMP_NUM_THREADS``, else the default."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() and int(env) > 0 else default_cpu_threads()
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()
