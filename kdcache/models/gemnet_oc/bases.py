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

# envelopes and radial bases are shared with the students: one home, kdcache.models.radial
from kdcache.models.radial import GaussianBasis, RadialBasis
from kdcache.models.scaling import ScaleFactor


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
