"""Variance-preserving scaling shared by the models: fitted scale factors and the scaled SiLU.

Model-neutral on purpose: students (PaiNN) and the teacher (GemNet-OC) both use these, and a
student run must never import the teacher's package.
"""

from __future__ import annotations

import torch
from torch import nn


class ScaledSiLU(nn.Module):
    """SiLU divided by 0.6, which keeps unit-variance inputs close to unit variance."""

    def __init__(self) -> None:
        super().__init__()
        # a plain float (not a tensor), so scale-factor discovery by name does not pick it up
        self.scale_factor = 1 / 0.6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(x) * self.scale_factor


class ScaleFactor(nn.Module):
    """A fitted constant multiplying a layer's output (identity while it is still zero).

    Stored as a parameter with ``requires_grad=False`` — as in the reference — so it travels in
    the state dict under ``<name>.scale_factor`` (Open Catalyst checkpoints load unchanged) but
    is neither trained nor part of the EMA. ``kdcache.models.checkpoint`` finds these modules by
    that attribute name, not by class.

    Args:
        name: key of this factor in a scale file (None: its module path is used).
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.scale_factor = nn.Parameter(torch.tensor(0.0), requires_grad=False)

    @property
    def fitted(self) -> bool:
        return bool(self.scale_factor.detach().cpu() != 0.0)

    @torch.no_grad()
    def set_(self, value: float | torch.Tensor) -> None:
        self.scale_factor.fill_(float(value))

    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        # ``ref`` is the tensor the factor was fitted against (fitting only; unused here).
        # An unfitted factor (0) means "no scaling", not "multiply by zero". Decided on the
        # device (no host sync on CUDA); x * 1 is exact, so this equals the reference's branch.
        sf = self.scale_factor.to(x.dtype)
        return x * torch.where(sf != 0, sf, torch.ones_like(sf))
