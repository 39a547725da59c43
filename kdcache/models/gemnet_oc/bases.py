"""Basis functions of GemNet-OC: radial (with a smooth envelope), circular and spherical.

Distances are first scaled to ``d / cutoff`` in [0, 1]; the envelope takes the basis smoothly to
zero at the cutoff. Angles enter through real spherical harmonics of order m = 0 (Legendre
polynomials times their normalisation) or, for two angles, their outer product
(``legendre_outer``) or full real spherical harmonics.

Module and buffer names (``rbf.offset``, ``radial_basis``, ``scale_rbf``, ...) follow the Open
Catalyst implementation so its checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from kdcache.models.gemnet_oc.layers import ScaleFactor


# --------------------------------------------------------------------------------------------
# envelopes
# --------------------------------------------------------------------------------------------
class PolynomialEnvelope(nn.Module):
    """u(d) = 1 + a d^p + b d^(p+1) + c d^(p+2) for d < 1, else 0 (smooth to second order).

    Args:
        exponent: p > 0.
    """

    def __init__(self, exponent: int) -> None:
        super().__init__()
        if exponent <= 0:
            raise ValueError(f"envelope exponent must be positive, got {exponent}")
        p = float(exponent)
        self.p = p
        self.a = -(p + 1) * (p + 2) / 2
        self.b = p * (p + 2)
        self.c = -p * (p + 1) / 2

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        p = self.p
        value = 1 + self.a * d_scaled**p + self.b * d_scaled ** (p + 1) + self.c * d_scaled ** (p + 2)
        return torch.where(d_scaled < 1, value, torch.zeros_like(d_scaled))


class ExponentialEnvelope(nn.Module):
    """u(d) = exp(-d² / ((1 - d)(1 + d))) for d < 1, else 0 (SpookyNet's cutoff)."""

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        value = torch.exp(-(d_scaled**2) / ((1 - d_scaled) * (1 + d_scaled)))
        return torch.where(d_scaled < 1, value, torch.zeros_like(d_scaled))


# --------------------------------------------------------------------------------------------
# radial bases (of the scaled distance)
# --------------------------------------------------------------------------------------------
class GaussianBasis(nn.Module):
    """Gaussians with centres evenly spaced on [start, stop] and width = their spacing.

    Args:
        start: first centre.
        stop: last centre.
        num_gaussians: number of centres.
        trainable: learn the centres (a parameter) instead of fixing them (a buffer).
    """

    def __init__(self, start: float = 0.0, stop: float = 5.0, num_gaussians: int = 50, trainable: bool = False):
        super().__init__()
        centres = torch.linspace(start, stop, num_gaussians)
        if trainable:
            self.offset = nn.Parameter(centres)
        else:
            self.register_buffer("offset", centres)
        spacing = (stop - start) / (num_gaussians - 1)
        self.coeff = -0.5 / spacing**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = x[:, None] - self.offset[None, :]
        return torch.exp(self.coeff * diff.pow(2))


class SphericalBesselBasis(nn.Module):
    """sqrt(2/c³) sin(k π d) / d with learnable frequencies k π (initialised to k = 1..n).

    Args:
        num_radial: number of frequencies.
        cutoff: cutoff in Å (enters the normalisation only).
    """

    def __init__(self, num_radial: int, cutoff: float):
        super().__init__()
        self.norm_const = math.sqrt(2 / cutoff**3)
        self.frequencies = nn.Parameter(math.pi * torch.arange(1, num_radial + 1, dtype=torch.float32))

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        d = d_scaled[:, None]
        return self.norm_const / d * torch.sin(self.frequencies * d)


class BernsteinBasis(nn.Module):
    """Bernstein polynomials in exp(-γ d) with learnable γ = softplus(pregamma).

    Args:
        num_radial: number of polynomials (degree num_radial - 1).
        pregamma_initial: initial pre-softplus γ (0.45264 gives γ ≈ 0.94486, half an inverse Bohr).
    """

    def __init__(self, num_radial: int, pregamma_initial: float = 0.45264):
        super().__init__()
        k = torch.arange(num_radial)
        binom = torch.tensor([math.comb(num_radial - 1, int(i)) for i in k], dtype=torch.float32)
        self.register_buffer("prefactor", binom, persistent=False)
        self.pregamma = nn.Parameter(torch.tensor(pregamma_initial, dtype=torch.float32))
        self.register_buffer("exp1", k[None, :], persistent=False)
        self.register_buffer("exp2", (num_radial - 1 - k)[None, :], persistent=False)

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        gamma = nn.functional.softplus(self.pregamma)
        e = torch.exp(-gamma * d_scaled)[:, None]
        return self.prefactor * e**self.exp1 * (1 - e) ** self.exp2


class RadialBasis(nn.Module):
    """Envelope(d/c) · rbf(d/c): the radial part every edge embedding starts from.

    Args:
        num_radial: number of radial functions.
        cutoff: cutoff in Å.
        rbf: ``{"name": "gaussian" | "spherical_bessel" | "bernstein", **hyperparameters}``.
        envelope: ``{"name": "polynomial", "exponent": p}`` or ``{"name": "exponential"}``.
        scale_basis: multiply the result by a fitted scale factor.
    """

    def __init__(
        self,
        num_radial: int,
        cutoff: float,
        rbf: dict | None = None,
        envelope: dict | None = None,
        scale_basis: bool = False,
    ):
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
            raise ValueError(f"unknown envelope {env_name!r}")

        rbf_name = str(rbf.pop("name")).lower()
        if rbf_name == "gaussian":
            # scaled distances live in [0, 1]
            self.rbf = GaussianBasis(start=0, stop=1, num_gaussians=num_radial, **rbf)
        elif rbf_name == "spherical_bessel":
            self.rbf = SphericalBesselBasis(num_radial=num_radial, cutoff=cutoff, **rbf)
        elif rbf_name == "bernstein":
            self.rbf = BernsteinBasis(num_radial=num_radial, **rbf)
        else:
            raise ValueError(f"unknown radial basis {rbf_name!r}")

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        d_scaled = d * self.inv_cutoff
        out = self.envelope(d_scaled)[:, None] * self.rbf(d_scaled)
        if self.scale_basis:
            out = self.scale_rbf(out)
        return out  # [E, num_radial]


# --------------------------------------------------------------------------------------------
# angular functions
# --------------------------------------------------------------------------------------------
def _norm_lm(l: int, m: int) -> float:
    """Normalisation sqrt((2l+1)/(4π) · (l-|m|)!/(l+|m|)!) of a spherical harmonic."""
    m = abs(m)
    return math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))


def legendre_harmonics(num_l: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Real spherical harmonics with m = 0, Y_l0(cos θ) = N_l P_l(cos θ), for l < num_l.

    Returns a function ``cos θ [T] -> [T, num_l]`` (Legendre polynomials by Bonnet's recursion).
    """
    norms = [_norm_lm(l, 0) for l in range(num_l)]

    def basis(z: torch.Tensor) -> torch.Tensor:
        polys = [torch.ones_like(z)]
        if num_l > 1:
            polys.append(z)
        for l in range(2, num_l):
            polys.append(((2 * l - 1) * z * polys[l - 1] - (l - 1) * polys[l - 2]) / l)
        return torch.stack([n * p for n, p in zip(norms, polys)], dim=1)

    return basis


def real_spherical_harmonics(num_l: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """All real spherical harmonics Y_lm(θ, φ) for l < num_l, from (cos θ, φ).

    The associated Legendre functions carry the Condon–Shortley phase and the real harmonics an
    extra (-1)^m, as in the reference; per l the columns run m = 0, 1, ..., l, -l, ..., -1.
    Returns a function ``(cos θ [T], φ [T]) -> [T, num_l²]``.
    """

    def basis(z: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        sin_t = torch.sqrt(1 - z**2)
        # P[l][m] for 0 <= m <= l
        P: list[list[torch.Tensor | None]] = [[None] * (l + 1) for l in range(num_l)]
        P[0][0] = torch.ones_like(z)
        for l in range(1, num_l):
            P[l][l] = (1 - 2 * l) * sin_t * P[l - 1][l - 1]
        for m in range(num_l - 1):
            P[m + 1][m] = (2 * m + 1) * z * P[m][m]
        for l in range(2, num_l):
            for m in range(l - 1):
                P[l][m] = ((2 * l - 1) * z * P[l - 1][m] - (l + m - 1) * P[l - 2][m]) / (l - m)
        cols = []
        for l in range(num_l):
            cols.append(_norm_lm(l, 0) * P[l][0])
            for m in range(1, l + 1):
                cols.append(math.sqrt(2) * (-1) ** m * _norm_lm(l, m) * P[l][m] * torch.cos(m * phi))
            for m in range(l, 0, -1):
                cols.append(math.sqrt(2) * (-1) ** m * _norm_lm(l, m) * P[l][m] * torch.sin(m * phi))
        return torch.stack(cols, dim=1)

    return basis


class CircularBasisLayer(nn.Module):
    """Radial basis of an edge and angular basis of a triplet angle.

    Args:
        num_spherical: number of angular functions.
        radial_basis: a (possibly shared) :class:`RadialBasis`.
        cbf: ``{"name": "spherical_harmonics" | "gaussian", **hyperparameters}``.
        scale_basis: multiply the angular basis by a fitted scale factor.
    """

    def __init__(self, num_spherical: int, radial_basis: RadialBasis, cbf: dict, scale_basis: bool = False):
        super().__init__()
        self.radial_basis = radial_basis
        self.scale_basis = scale_basis
        if scale_basis:
            self.scale_cbf = ScaleFactor()
        cbf = dict(cbf)
        name = str(cbf.pop("name")).lower()
        if name == "gaussian":
            self.cosφ_basis = GaussianBasis(start=-1, stop=1, num_gaussians=num_spherical, **cbf)
        elif name == "spherical_harmonics":
            self.cosφ_basis = legendre_harmonics(num_spherical)
        else:
            raise ValueError(f"unknown circular basis {name!r}")

    def forward(self, distance: torch.Tensor, cos_angle: torch.Tensor):
        rad = self.radial_basis(distance)  # [E, num_radial]
        cir = self.cosφ_basis(cos_angle)  # [T, num_spherical]
        if self.scale_basis:
            cir = self.scale_cbf(cir)
        return rad, cir


class SphericalBasisLayer(nn.Module):
    """Radial basis of an edge and a two-angle basis of a quadruplet.

    Args:
        num_spherical: functions per angle (the basis has num_spherical² columns).
        radial_basis: a (possibly shared) :class:`RadialBasis`.
        sbf: ``{"name": "legendre_outer" | "spherical_harmonics" | "gaussian_outer", ...}``.
        scale_basis: multiply the angular basis by a fitted scale factor.
    """

    def __init__(self, num_spherical: int, radial_basis: RadialBasis, sbf: dict, scale_basis: bool = False):
        super().__init__()
        self.num_spherical = num_spherical
        self.radial_basis = radial_basis
        self.scale_basis = scale_basis
        if scale_basis:
            self.scale_sbf = ScaleFactor()
        sbf = dict(sbf)
        name = str(sbf.pop("name")).lower()
        self.sbf_name = name
        if name == "spherical_harmonics":
            self._sph = real_spherical_harmonics(num_spherical)
        elif name == "legendre_outer":
            self._leg = legendre_harmonics(num_spherical)
        elif name == "gaussian_outer":
            # a module attribute, so a trainable variant would be registered like the reference
            self.circular_basis = GaussianBasis(start=-1, stop=1, num_gaussians=num_spherical, **sbf)
        else:
            raise ValueError(f"unknown spherical basis {name!r}")

    def spherical_basis(self, cos_angle: torch.Tensor, dihedral: torch.Tensor) -> torch.Tensor:
        n = self.num_spherical
        if self.sbf_name == "spherical_harmonics":
            return self._sph(cos_angle, dihedral)
        f = self._leg if self.sbf_name == "legendre_outer" else self.circular_basis
        # outer product of the basis of the angle and of the cosine of the dihedral angle
        return (f(cos_angle)[:, :, None] * f(torch.cos(dihedral))[:, None, :]).reshape(cos_angle.shape[0], n * n)

    def forward(self, distance: torch.Tensor, cos_angle: torch.Tensor, dihedral: torch.Tensor):
        rad = self.radial_basis(distance)
        sph = self.spherical_basis(cos_angle, dihedral)  # [Q, num_spherical²]
        if self.scale_basis:
            sph = self.scale_sbf(sph)
        return rad, sph
