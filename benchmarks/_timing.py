"""Interleaved timing for the benchmarks: ways that are compared run in turn (A B A B ...).

On a shared machine the load from other jobs changes from second to second; timing each way in
turn, round after round, lets that load hit every way alike, so the median of each way and their
ratio stay meaningful even when absolute figures do not. Wall time and this process's CPU time
are both kept: CPU time is less disturbed by other jobs (but counts every thread's work).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Timings:
    """Seconds per round of one way.

    Args:
        wall: wall-clock seconds of each round.
        cpu: CPU seconds of this process in each round (all threads).
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def rate(self, units: float, clock: str = "wall") -> float:
        """Median units per second over the rounds (``units`` done in each round).

        Args:
            units: work done in one round (samples, steps).
            clock: ``"wall"`` or ``"cpu"``.
        """
        seconds = self.wall if clock == "wall" else self.cpu
        return units / statistics.median(seconds)


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> tuple[float, float, object]:
    """Run ``fn`` once: ``(wall seconds, CPU seconds, what it returned)``.

    Args:
        fn: the work.
        sync: called before each clock reading (a CUDA synchronise), so queued device work counts.
    """
    if sync:
        sync()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - w0, time.process_time() - c0, out


def interleaved(ways: dict[str, Callable[[], object]], rounds: int,
                sync: Callable[[], None] | None = None) -> dict[str, Timings]:
    """Time every way once per round, in turn, for ``rounds`` rounds.

    Args:
        ways: name -> one round of that way's work (already warmed up: compile costs are not
            timed here).
        rounds: how many rounds.
        sync: see :func:`timed`.

    Returns:
        name -> :class:`Timings`, one entry per round.
    """
    out = {name: Timings() for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            wall, cpu, _ = timed(fn, sync)
            out[name].wall.append(wall)
            out[name].cpu.append(cpu)
    return out
