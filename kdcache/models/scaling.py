"""Variance-preserving scaling shared by the models: fitted scale factors, the scaled SiLU and
the scale files that set the factors.

Model-neutral on purpose: students (PaiNN) and the teacher (GemNet-OC) both use these, and a
student run must never import the teacher's package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from kdcache.errors import CheckpointError
from kdcache.models.torchfile import read_checkpoint


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
    is neither trained nor part of the EMA. :func:`scale_factor_modules` finds these modules by
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


# ---------------------------------------------------------------------------------------------
# scale files
# ---------------------------------------------------------------------------------------------


def holds_scale_factor(module: nn.Module) -> bool:
    """True for a module with a fitted 0-dim ``scale_factor`` tensor (a :class:`ScaleFactor`,
    or any module that follows its convention); :class:`ScaledSiLU`'s float does not count."""
    sf = getattr(module, "scale_factor", None)
    return isinstance(sf, torch.Tensor) and sf.dim() == 0


def scale_factor_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Scale-factor submodules by the name a scale file uses for them.

    Args:
        model: any module.

    Returns:
        ``{key: module}``; the key is the module's ``name`` attribute when set (GemNet-OC), else
        its module path (PaiNN).
    """
    return {getattr(m, "name", None) or path: m for path, m in model.named_modules() if holds_scale_factor(m)}


def _read_scale_file(scale_file) -> dict[str, float]:
    if isinstance(scale_file, Mapping):
        raw = dict(scale_file)
    else:
        path = Path(scale_file)
        if not path.is_file():
            raise CheckpointError(f"scale file {path}: no such file")
        try:
            if path.suffix == ".json":
                raw = json.loads(path.read_text())
            elif path.suffix == ".pt":
                raw = read_checkpoint(path, what="scale file")
            else:
                raise CheckpointError(f"scale file {path}: unsupported extension {path.suffix!r} (.json or .pt)")
        except CheckpointError:
            raise
        except Exception as exc:  # unreadable JSON
            raise CheckpointError(f"scale file {path}: cannot be read ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"scale file {path}: expected a mapping of names to numbers")
    raw.pop("comment", None)  # old JSON scale files carry the model name there
    out = {}
    for k, v in raw.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"scale file {scale_file}: entry {k!r} is not a number") from exc
    return out


def apply_scale_file(model: nn.Module, scale_file) -> list[str]:
    """Set a model's scale factors from a JSON/.pt file or a dict ``{name: value}``.

    Every scale factor of the model must be present. Entries the model does not have are
    ignored (older files name factors of removed layers).

    Args:
        model: the model.
        scale_file: path of a ``.json``/``.pt`` file, or a mapping ``{name: value}``.

    Returns:
        The names set.

    Raises:
        CheckpointError: unreadable file, non-numeric entry, or a factor without a value.
    """
    values = _read_scale_file(scale_file)
    modules = scale_factor_modules(model)
    missing = sorted(set(modules) - set(values))
    if missing:
        raise CheckpointError(f"scale file {scale_file}: no value for scale factor(s) {missing}")
    with torch.no_grad():
        for name, module in modules.items():
            module.scale_factor.fill_(values[name])
    return sorted(modules)
