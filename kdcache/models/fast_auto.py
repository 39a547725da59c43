"""``fast: auto``, the default of ``kdcache train``, ``extract`` and ``eval``: the compiled path
(:mod:`kdcache.models.fast`) where it pays for its compile, the eager one elsewhere.

The compiled path costs one compile up front (a minute or more on a cold cache) and then runs
several times faster; whether that pays depends on how much eager work it replaces. ``auto``
estimates it before the run: it times the eager model on one batch of the run's own data (twice
when it is quick: the faster counts, the first includes one-time set-up), multiplies by the run's
batches, and takes the compiled path when the time it would save at the architecture's *measured* speed-up
exceeds the architecture's *measured* cold compile (:attr:`PotentialModel.fast_payoff
<kdcache.models.base.PotentialModel.fast_payoff>`, from docs/benchmarks-models.md, rounded to the
safe side). Runs of fewer than :data:`MIN_BATCHES` batches stay eager without timing: no measured
compile is won back by so little work, and tests and short evaluations pay nothing.

What ``auto`` never turns on: a device other than the CPU (the speed-ups are measured on the CPU
only; ``--fast`` turns it on anywhere), an architecture without measured figures for the mode (a
model of your own, GemNet-OC training), and what the compiled path cannot run (the hessian
strategy, ``--hessian-probes``, ``--feature`` hooks, adapter and calculator teachers). An explicit
``true``/``false`` is obeyed as given (and refused where the compiled path cannot run).

The decision decides the run's round-off, so it is made once: ``kdcache train`` writes the chosen
value to the run's ``config.yaml`` and a resumed run keeps it; a store records ``fast: true`` in
its request and a resumed extraction keeps what the store says. Under ``torchrun`` rank 0
decides for every rank. The reason is printed (not for a job that stays eager because it is
short or far from paying), so a user can pin the choice (``--fast``/``--no-fast``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

#: the setting's third value, besides true and false
AUTO = "auto"
#: runs with fewer batches stay eager untimed: the timing costs up to two batches, and at the
#: students' 60 s compile and 5x training speed-up a batch would have to take 4.7 s eager to pay
#: (GemNet-OC's inference: 52 s)
MIN_BATCHES = 16
#: an eager batch this slow is timed once: its one-time set-up is a small share of it
ONE_CALL_SECONDS = 0.5
#: modes of the compiled path: inference (stage one, evaluation) and training steps
MODES = ("inference", "training")


@dataclass(frozen=True)
class FastPayoff:
    """What the compiled path of an architecture was measured to give, in one mode, on the CPU.

    Args:
        speedup: the lowest fast/eager throughput ratio measured (1 and 2 threads), rounded down.
        compile_seconds: the longest cold compile measured, rounded up.
    """

    speedup: float
    compile_seconds: float

    def saved_seconds(self, eager_seconds: float) -> float:
        """Time the compiled path saves on work that takes ``eager_seconds`` eagerly, before its compile."""
        return eager_seconds * (1.0 - 1.0 / self.speedup)


@dataclass(frozen=True)
class FastDecision:
    """Whether a run uses the compiled path, and why (printed for ``auto``, unless ``quiet``).

    Args:
        fast: the compiled path.
        reason: why, as the user reads it.
        quiet: nothing worth printing: a job that stays eager because it is short, or saves
            less than half a compile.
    """

    fast: bool
    reason: str
    quiet: bool = False

    def describe(self) -> str:
        return f"fast path: {'on' if self.fast else 'off'} ({self.reason})"


#: PaiNN's and SchNet's measured figures (docs/benchmarks-models.md, OC20 widths, 1 and 2 CPU
#: threads): inference 2.2-6.0x, training steps 5.2-10.6x; cold compiles 17-46 s (25-58 s on a
#: loaded machine)
STUDENT_PAYOFF = {"inference": FastPayoff(speedup=2.0, compile_seconds=60.0),
                  "training": FastPayoff(speedup=5.0, compile_seconds=60.0)}
#: GemNet-OC's: inference 1.35-1.56x (bucketed quadruplets, three runs); cold compiles 84-126 s
#: (184 s on a loaded machine). Its training steps are not measured, so ``auto`` never trains it compiled.
GEMNET_OC_PAYOFF = {"inference": FastPayoff(speedup=1.3, compile_seconds=190.0)}


def eager_batch_seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of one eager call of ``run``: the faster of two (the first includes one-time
    set-up), or the first alone when it took :data:`ONE_CALL_SECONDS` or more."""
    best = math.inf
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if best >= ONE_CALL_SECONDS:
            break
    return best


def decide_fast(setting: bool | str, model, mode: str, batches: int, device: torch.device,
                time_batch: Callable[[], float], cannot: str | None = None) -> FastDecision:
    """Resolve a ``fast`` setting (module docstring).

    Args:
        setting: ``True``, ``False`` or ``"auto"``.
        model: the eager model that would be compiled (its class's :attr:`fast_payoff`).
        mode: ``"inference"`` or ``"training"``.
        batches: the batches (optimiser steps) the run will compute.
        device: where it runs.
        time_batch: seconds of one eager batch of the run (:func:`eager_batch_seconds`); called
            only when the estimate needs it.
        cannot: why the compiled path cannot run this job (``None``: it can); ``auto`` then
            stays eager, and an explicit ``True`` is the caller's to refuse.

    Returns:
        The decision; for ``True``/``False`` the setting itself.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if setting is True or setting is False:
        return FastDecision(setting, "asked for")
    if setting != AUTO:
        raise ValueError(f"fast must be true, false or {AUTO!r}, got {setting!r}")
    if batches < MIN_BATCHES:  # before the other reasons: a short job says nothing
        return FastDecision(False, f"auto: {batches} batches are too few to win back a compile", quiet=True)
    if cannot:
        return FastDecision(False, f"auto: {cannot}")
    name = getattr(model, "name", type(model).__name__)
    splits_body = getattr(model, "splits_body", None)
    if not (callable(splits_body) and splits_body()):
        return FastDecision(False, f"auto: {name} has no compiled path")
    if device.type != "cpu":
        return FastDecision(False, f"auto: its speed-up is measured on the CPU only; --fast uses it on {device.type}")
    payoff = (getattr(model, "fast_payoff", None) or {}).get(mode)
    if payoff is None:
        return FastDecision(False, f"auto: no measured {mode} speed-up for {name}; --fast uses it anyway")
    seconds = time_batch()
    eager = batches * seconds
    saved = payoff.saved_seconds(eager)
    why = (f"auto: {batches} batches x {1e3 * seconds:.0f} ms eager = {_duration(eager)}; compiled "
           f"(>= {payoff.speedup:g}x) it would save {_duration(saved)}, against a compile of up to "
           f"{_duration(payoff.compile_seconds)} on a cold cache")
    fast = saved > payoff.compile_seconds
    # a job far from paying stays eager as it always did: nothing worth a line on stderr
    return FastDecision(fast, why, quiet=not fast and saved < payoff.compile_seconds / 2)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


__all__ = ["AUTO", "FastDecision", "FastPayoff", "GEMNET_OC_PAYOFF", "MIN_BATCHES", "STUDENT_PAYOFF", "decide_fast",
           "eager_batch_seconds"]
