"""A tiny potential that is none of kdcache's architectures, for the adapter-teacher tests
(``kdcache extract --teacher py:tests.store.tiny_adapter:make``).

Per-atom features from an MLP on all pair distances within a structure (no cutoff, no periodic
images: the test molecules sit in a large box), a vector head ``[N, 3, d]`` that sums unit pair
vectors weighted by the neighbours' features, and an energy read out from both. Named
submodules give the hook tests their paths: ``interactions.0`` / ``interactions.1`` (per atom,
``[N, d]``), ``vector_head`` (``[N, 3, d]``), ``interactions.0.filter`` (per *pair*: not
hookable as a per-atom feature).
"""

from __future__ import annotations

import torch
from torch import nn

from kdcache import keys as K


def pairs(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordered pair of distinct atoms of one structure: (i, j, pos[j] - pos[i])."""
    pos, which = batch[K.POSITIONS], batch[K.BATCH]
    same = (which[:, None] == which[None, :]) & ~torch.eye(len(which), dtype=torch.bool, device=pos.device)
    i, j = same.nonzero(as_tuple=True)
    return i, j, pos[j] - pos[i]


def expand(dist: torch.Tensor, width: int) -> torch.Tensor:
    """Gaussians of the distance on 0..5 Å, ``[P, width]``."""
    centres = torch.linspace(0.0, 5.0, width, dtype=dist.dtype, device=dist.device)
    return torch.exp(-((dist[:, None] - centres) ** 2) / 0.5)


class Interaction(nn.Module):
    """h_i + Σ_j filter(r_ij) * h_j, then a per-atom MLP: ``[N, d]``."""

    def __init__(self, d: int):
        super().__init__()
        self.filter = nn.Sequential(nn.Linear(d, d), nn.Tanh())  # [P, d]
        self.update = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, h, i, j, rbf):
        msg = torch.zeros_like(h).index_add_(0, i, self.filter(rbf) * h[j])
        return h + self.update(msg)


class VectorHead(nn.Module):
    """v_i = Σ_j unit(r_ij) ⊗ (w(r_ij) * h_j): ``[N, 3, d]``, rotates with the structure."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Linear(d, d)

    def forward(self, h, i, j, vec, rbf):
        unit = vec / vec.norm(dim=-1, keepdim=True)
        return torch.zeros(h.shape[0], 3, h.shape[1], dtype=h.dtype, device=h.device).index_add_(
            0, i, unit[:, :, None] * (self.weight(rbf) * h[j])[:, None, :])


class TinyPotential(nn.Module):
    """The adapter contract: forward(batch, features) -> energy [S] eV (forces by kdcache),
    atom_energy [N] and, when asked, node [N, d] (the last interaction's output)."""

    available_features = (K.NODE, K.ATOM_ENERGY)

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.hidden = hidden
        self.embedding = nn.Embedding(10, hidden)
        self.interactions = nn.ModuleList([Interaction(hidden) for _ in range(2)])
        self.vector_head = VectorHead(hidden)
        self.readout = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, batch, features=()):
        i, j, vec = pairs(batch)
        rbf = expand(vec.norm(dim=-1), self.hidden)
        h = self.embedding(batch[K.ATOMIC_NUMBERS].long())
        for block in self.interactions:
            h = block(h, i, j, rbf)
        v = self.vector_head(h, i, j, vec, rbf)
        atom_energy = self.readout(torch.cat([h, (v * v).sum(dim=1)], dim=-1)).squeeze(-1)
        energy = torch.zeros(batch[K.NATOMS].numel(), dtype=h.dtype, device=h.device).index_add_(
            0, batch[K.BATCH], atom_energy)
        out = {K.ENERGY: energy, K.ATOM_ENERGY: atom_energy}
        if K.NODE in features:
            out[K.NODE] = h
        return out


def make(hidden: int = 8, seed: int = 0, weights: str | None = None) -> TinyPotential:
    """The adapter function: a seeded TinyPotential, or one with the weights of a state-dict file.

    Args:
        hidden: channels.
        seed: initialisation seed.
        weights: a ``torch.save``'d state dict (the function's business, not kdcache's).
    """
    torch.manual_seed(seed)
    model = TinyPotential(hidden)
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model


def not_a_module():
    """An adapter function that breaks the contract: it gives no torch module."""
    return {"energy": 0.0}
