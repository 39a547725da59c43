"""A batch sampler whose batches read nearby parts of the store.

A fully random permutation makes every batch touch a different part of a (possibly larger than
memory) store. :class:`LocalBatchSampler` shuffles *windows* of consecutive samples and the samples
inside each window, so each batch comes from one window (a few shards) while every sample is still
visited exactly once per epoch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class LocalBatchSampler:
    """Shuffled windows of consecutive samples, cut into batches.

    Args:
        num_samples: samples ``0..num_samples-1`` (dataset indices of a store that holds them).
        batch_size: samples per batch.
        window: consecutive samples that are shuffled together (about a shard's worth is good).
        shuffle: shuffle windows and samples inside windows (else plain order).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        drop_last: drop the last incomplete batch (of each rank).
        rank: this process's rank (distributed training).
        world_size: number of ranks. Batches are dealt round-robin; when they do not divide
            evenly, ``drop_last=False`` repeats the first samples of the epoch so that every rank
            gets the same number of batches (as torch's ``DistributedSampler`` does), and
            ``drop_last=True`` drops the surplus.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        window: int = 2048,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0 or window <= 0 or num_samples < 0:
            raise ValueError("num_samples >= 0, batch_size > 0 and window > 0 are required")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_samples, self.batch_size, self.window = int(num_samples), int(batch_size), int(window)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self._start = 0  # batches of this epoch already consumed (resume point)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (unless a loaded state says otherwise)."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        starts = np.arange(0, n, self.window)
        parts = []
        for w in rng.permutation(len(starts)):
            lo = starts[w]
            parts.append(lo + rng.permutation(min(self.window, n - lo)))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _batches(self) -> list[np.ndarray]:
        order = self._order()
        b, w = self.batch_size, self.world_size
        n_batches = len(order) // b if self.drop_last else -(-len(order) // b)
        if w > 1:
            if self.drop_last:
                n_batches -= n_batches % w
            else:
                per_rank = -(-n_batches // w)
                need = per_rank * w * b
                if need > len(order) and len(order):
                    # pad with the epoch's first samples so every rank gets full, equal batches
                    reps = -(-need // len(order))
                    order = np.tile(order, reps)[:need]
                n_batches = per_rank * w
        batches = [order[i * b : (i + 1) * b] for i in range(n_batches)]
        return batches[self.rank :: w]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        start = self._start
        for i in range(start, len(batches)):
            self._start = i + 1
            yield batches[i].tolist()
        # a finished epoch: the next iteration is the next epoch, from its start
        self.epoch += 1
        self._start = 0

    def __len__(self) -> int:
        return len(self._batches())

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Position for an exact resume. ``batches_done`` overrides the count of batches of the
        current epoch already used (a DataLoader prefetches ahead of what the trainer consumed)."""
        return {
            "epoch": self.epoch,
            "batches_done": self._start if batches_done is None else int(batches_done),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "window": self.window,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_samples", "batch_size", "window", "shuffle", "world_size", "seed"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]!r}, this sampler {getattr(self, k)!r}")
        self.epoch = int(state["epoch"])
        self._start = int(state["batches_done"])
