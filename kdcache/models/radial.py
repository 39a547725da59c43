"""Radial functions shared by the models: smooth cutoff envelopes and radial bases.

Distances are scaled to ``u = d / cutoff``; an envelope takes the basis smoothly to zero at
u = 1. Model-neutral on purpose: students (PaiNN, SchNet) and the teacher (GemNet-OC) both use
these, and a student run must never import the teacher's package. Module and buffer names
(``rbf.offset``, ``envelope``, ``scale_rbf``, ``frequencies``, ``pregamma``) follow the Open
Catalyst implementation so its checkpoints load key for key.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from kdcache.models.scaling import ScaleFactor

# --------------------------------------------------------------------------------------------
# subnormal numbers
# --------------------------------------------------------------------------------------------
#: set by :func:`subnormals_flushed` (read when the compiled path traces the bases)
_FLUSH_SUBNORMALS = False


@contextlib.contextmanager
def subnormals_flushed():
    """Within: radial bases return exact zeros for values within a factor 2^24 of the dtype's
    smallest normal number (below ~2e-31 in float32), subnormal ones included.

    A Gaussian basis is subnormal or nearly so on a few functions of every edge (its tails
    underflow), and on x86 CPUs every operation that reads or produces a subnormal number takes
    a microcode assist: the weight gradient of PaiNN's basis projection (``[C, E] @ [E, num_rbf]``)
    ran ~70x slower than with zeros, and products of near-subnormal values with weights (> 6e-8)
    would underflow again. The compiled path (:mod:`kdcache.models.fast`) traces its body in here;
    its outputs change by less than 1e-30 absolute. The eager path does not flush (it stays the
    reference, bit for bit, and at the reference implementation's speed).
    """
    global _FLUSH_SUBNORMALS
    before, _FLUSH_SUBNORMALS = _FLUSH_SUBNORMALS, True
    try:
        yield
    finally:
        _FLUSH_SUBNORMALS = before


def _flushed(x: torch.Tensor) -> torch.Tensor:
    """``x``, with subnormal values set to zero inside :func:`subnormals_flushed`."""
    if not _FLUSH_SUBNORMALS:
        return x
    return torch.where(x.abs() < torch.finfo(x.dtype).tiny * 2.0**24, torch.zeros_like(x), x)


# --------------------------------------------------------------------------------------------
# envelopes
# --------------------------------------------------------------------------------------------


class PolynomialEnvelope(nn.Module):
    """Smooth cutoff 1 + a·u^p + b·u^(p+1) + c·u^(p+2) on u < 1, zero beyond.

    Value, slope and curvature vanish at u = 1.

    Args:
        exponent: p > 0.
    """

    def __init__(self, exponent: int = 5) -> None:
        super().__init__()
        if exponent <= 0:
            raise ValueError(f"envelope exponent must be positive, got {exponent}")
        p = float(exponent)
        self.p = p
        self.a = -(p + 1) * (p + 2) / 2
        self.b = p * (p + 2)
        self.c = -p * (p + 1) / 2

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        p = self.p
        # separate powers (not Horner) — the reference's rounding, for float64 parity
        value = 1 + self.a * u**p + self.b * u ** (p + 1) + self.c * u ** (p + 2)
        return torch.where(u < 1, value, torch.zeros_like(u))


class ExponentialEnvelope(nn.Module):
    """exp(-u² / ((1 - u)(1 + u))) on u < 1 (Unke et al. 2021, SpookyNet), zero beyond."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        inside = u < 1
        # evaluate on a safe copy so u >= 1 gives no inf/NaN (and no NaN gradients)
        safe = torch.where(inside, u, torch.zeros_like(u))
        value = torch.exp(-(safe**2) / ((1 - safe) * (1 + safe)))
        return torch.where(inside, value, torch.zeros_like(u))


# --------------------------------------------------------------------------------------------
# radial bases
# --------------------------------------------------------------------------------------------


class GaussianBasis(nn.Module):
    """Gaussians with centres evenly spaced on [start, stop] and width = their spacing.

    Centres and width are computed in float64 whatever the default dtype (float64 parity to
    1e-8 needs that very width); the centres are then stored in the default dtype. The
    forward rounds like the reference (``coeff * diff**2``).

    Args:
        start: first centre.
        stop: last centre.
        num_gaussians: number of basis functions.
        trainable: learn the centres (a parameter) instead of fixing them (a buffer).
    """

    def __init__(self, start: float = 0.0, stop: float = 5.0, num_gaussians: int = 50, trainable: bool = False) -> None:
        super().__init__()
        # explicit CPU: also works while building on the meta device (parameter counting)
        centres64 = torch.linspace(start, stop, num_gaussians, dtype=torch.float64, device="cpu")
        centres = centres64.to(torch.get_default_dtype())
        if trainable:
            self.offset = nn.Parameter(centres)
        else:
            self.register_buffer("offset", centres)
        spacing = (stop - start) / (num_gaussians - 1)
        self.coeff = -0.5 / spacing**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = x[:, None] - self.offset.to(x.dtype)[None, :]
        return _flushed(torch.exp(self.coeff * diff.pow(2)))


class SphericalBesselBasis(nn.Module):
    """sqrt(2/c³) sin(k π u) / u with learnable frequencies k π (initialised to k = 1..n).

    Args:
        num_radial: number of frequencies.
        cutoff: cutoff in Å (enters the normalisation only).
    """

    def __init__(self, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.norm_const = math.sqrt(2 / cutoff**3)
        self.frequencies = nn.Parameter(math.pi * torch.arange(1, num_radial + 1, dtype=torch.float32))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        d = u[:, None]
        return self.norm_const / d * torch.sin(self.frequencies * d)


class BernsteinBasis(nn.Module):
    """Bernstein polynomials in exp(-γ u) with learnable γ = softplus(pregamma).

    Args:
        num_radial: number of polynomials (degree num_radial - 1).
        pregamma_initial: initial pre-softplus γ (0.45264 gives γ ≈ 0.94486, half an inverse Bohr).
    """

    def __init__(self, num_radial: int, pregamma_initial: float = 0.45264) -> None:
        super().__init__()
        k = torch.arange(num_radial)
        binom = torch.tensor([math.comb(num_radial - 1, int(i)) for i in k], dtype=torch.float32)
        self.register_buffer("prefactor", binom, persistent=False)
        self.pregamma = nn.Parameter(torch.tensor(pregamma_initial, dtype=torch.float32))
        self.register_buffer("exp1", k[None, :], persistent=False)
        self.register_buffer("exp2", (num_radial - 1 - k)[None, :], persistent=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        gamma = nn.functional.softplus(self.pregamma)
        e = torch.exp(-gamma * u)[:, None]
        return self.prefactor * e**self.exp1 * (1 - e) ** self.exp2


class RadialBasis(nn.Module):
    """Envelope(d/c) · rbf(d/c): ``[E] -> [E, num_radial]``.

    Args:
        num_radial: number of radial functions.
        cutoff: cutoff radius (Å).
        rbf: ``{"name": "gaussian" | "spherical_bessel" | "bernstein", **hyperparameters}``.
        envelope: ``{"name": "polynomial", "exponent": p}`` or ``{"name": "exponential"}``.
        scale_basis: multiply the result by a fitted scale factor (``scale_rbf``).
    """

    def __init__(
        self,
        num_radial: int,
        cutoff: float,
        rbf: dict | None = None,
        envelope: dict | None = None,
        scale_basis: bool = False,
    ) -> None:
        super().__init__()
        rbf = dict(rbf or {"name": "gaussian"})
        envelope = dict(envelope or {"name": "polynomial", "exponent": 5})
        self.inv_cutoff = 1 / cutoff
        self.scale_basis = scale_basis
        if scale_basis:
            self.scale_rbf = ScaleFactor()

        env_name = str(envelope.pop("name")).lower()
        if env_name == "polynomial":
            self.envelope = PolynomialEnvelope(**envelope)
        elif env_name == "exponential":
            self.envelope = ExponentialEnvelope(**envelope)
        else:
            raise ValueError(f"unknown envelope {env_name!r} (polynomial, exponential)")

        rbf_name = str(rbf.pop("name")).lower()
        if rbf_name == "gaussian":
            # scaled distances live in [0, 1]
            self.rbf = GaussianBasis(start=0, stop=1, num_gaussians=num_radial, **rbf)
        elif rbf_name == "spherical_bessel":
            self.rbf = SphericalBesselBasis(num_radial=num_radial, cutoff=cutoff, **rbf)
        elif rbf_name == "bernstein":
            self.rbf = BernsteinBasis(num_radial=num_radial, **rbf)
        else:
            raise ValueError(f"unknown radial basis {rbf_name!r} (gaussian, spherical_bessel, bernstein)")

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        u = d * self.inv_cutoff
        out = self.envelope(u)[:, None] * self.rbf(u)
        if self.scale_basis:
            out = self.scale_rbf(out)
        return _flushed(out)
