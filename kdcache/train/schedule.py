"""Learning-rate schedules of the reference training, as one small resumable object.

``warmup_step``: linear warm-up from ``warmup_factor·lr`` to ``lr`` over ``warmup_steps``, then
multiply by ``gamma`` at each milestone step. ``warmup_exp``: the same warm-up, then
``lr·rate^(step/decay_steps)``. ``plateau``: multiply by ``factor`` when the validation loss has not
improved for ``patience`` validations. ``constant``: warm-up (if any), then ``lr``.
"""

from __future__ import annotations

import bisect
import math

import torch


class LRSchedule:
    """Sets the optimiser's learning rate from the step count (and validation losses for plateau).

    Args:
        optimizer: the optimiser whose groups get the rate.
        name: ``constant`` | ``warmup_step`` | ``warmup_exp`` | ``plateau``.
        lr: peak learning rate.
        warmup_steps, warmup_factor: linear warm-up.
        milestones, gamma: step decay.
        decay_steps, decay_rate: exponential decay.
        patience, factor: reduce-on-plateau.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str = "constant", lr: float = 5e-4,
                 warmup_steps: int = 0, warmup_factor: float = 0.2, milestones=(), gamma: float = 0.1,
                 decay_steps: int = 100000, decay_rate: float = 0.1, patience: int = 3, factor: float = 0.8,
                 min_lr: float = 0.0):
        self.optimizer, self.name, self.lr = optimizer, name, float(lr)
        self.warmup_steps, self.warmup_factor = int(warmup_steps), float(warmup_factor)
        self.milestones, self.gamma = sorted(int(m) for m in milestones), float(gamma)
        self.decay_steps, self.decay_rate = int(decay_steps), float(decay_rate)
        self.patience, self.factor, self.min_lr = int(patience), float(factor), float(min_lr)
        self.step_count = 0
        self.plateau_scale, self.best, self.bad = 1.0, math.inf, 0
        self._apply()

    def factor_at(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            frac = step / self.warmup_steps
            warm = self.warmup_factor * (1.0 - frac) + frac
        else:
            warm = 1.0
        if self.name == "warmup_step":
            return warm * self.gamma ** bisect.bisect_right(self.milestones, step)
        if self.name == "warmup_exp":
            return warm * self.decay_rate ** (max(0, step - self.warmup_steps) / self.decay_steps)
        if self.name == "plateau":
            return warm * self.plateau_scale
        return warm

    def current_lr(self) -> float:
        return max(self.min_lr, self.lr * self.factor_at(self.step_count))

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.current_lr()

    def step(self) -> None:
        """After each optimiser step."""
        self.step_count += 1
        self._apply()

    def on_validation(self, loss: float) -> None:
        """Reduce-on-plateau bookkeeping (other schedules ignore validation)."""
        if self.name != "plateau":
            return
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.plateau_scale *= self.factor
                self.bad = 0
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale, self.best, self.bad = float(state["plateau_scale"]), float(state["best"]), int(state["bad"])
        self._apply()
