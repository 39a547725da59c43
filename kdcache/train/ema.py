"""Exponential moving average of weights, used for validation and saved in checkpoints."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """Shadow copy of a module's trainable parameters, ``s <- d·s + (1 - d)·p`` after every step.

    As in the reference trainer the decay ramps up early, ``d = min(decay, (1 + n) / (10 + n))``
    with ``n`` the number of updates, so the average does not remember the random initialisation.

    Args:
        module: the module whose ``parameters()`` (those with ``requires_grad``) are averaged.
        decay: the final decay (0.999).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.num_updates = 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)

    @contextlib.contextmanager
    def average_parameters(self):
        """Temporarily load the averaged weights into the module (restored afterwards)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for s, v in zip(self.shadow, state["shadow_params"]):
                s.copy_(v.to(s.device, s.dtype))
