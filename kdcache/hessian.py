"""Hessian-vector products: the probes and the math, shared by stage one and stage two.

Stage one (``kdcache extract --hessian-probes K``) stores, per structure, K products of the
teacher's force Jacobian with random probe vectors,

    hvp_k = −∂F/∂x · v_k    ([N, 3] for each probe k; stored as ``hvp [N, 3, K]``),

which for a gradient-force teacher (F = −∂E/∂x) is the energy Hessian times the probe, H·v_k, and
for a direct-force teacher the Jacobian of its force head, −J_F·v_k. Stage two's ``hessian``
strategy computes the student's products for the same probes and matches them.

The probes are never stored: they are a function of the sample's dataset index alone
(:func:`probe_vectors`), drawn on the CPU in float64 from generators seeded by that index, so
extraction on any number of ranks and every training epoch see the same ones. Each probe is
standard normal per atom and axis (no zero-mean projection: a rigid translation has zero product
for both teacher and student, so it adds nothing to either side), and zero on atoms the data mark
fixed: those atoms never move, so the products along them are of no use, and the loss is taken
over the free atoms' rows, like the force loss. Probe k of a sample is the same whatever K is
(each probe has its own seed), so a store with 4 probes extends one with 2.

Both sides differentiate through the forces with reverse-mode autograd only
(:func:`force_jacobian_products`): for gradient forces the Jacobian is symmetric (−H), so one
vector-Jacobian product per probe gives it; for direct forces the Jacobian-vector product comes
from the double-vjp trick (the vjp ``u ↦ J^T u`` is linear in ``u``, and its vjp with ``v`` is
``J v``), which needs no forward-mode support from the model's operations.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from kdcache import keys as K
from kdcache.errors import ConfigError

#: how the probes are made; recorded in a store (``hessian.probes_from``) and checked by stage
#: two, which regenerates them: a future change of the rule gets a new name
PROBE_RULE = ("kdcache-hvp-v1: standard normal [N, 3] per probe, float64 on the CPU, seeded by the sample index and "
              "the probe's number; zero on fixed atoms")
#: the store's unit of ``hvp`` (a probe is dimensionless: a direction with components of order 1)
UNIT = "eV/Å² (times the dimensionless probe)"


def probe_seed(sample_index: int, probe: int) -> int:
    """The seed of one probe of a sample: a 63-bit digest of the rule's name, the dataset index
    and the probe's number.

    Args:
        sample_index: the sample's global dataset index (the store's ``sample_index``).
        probe: which probe (0 .. K-1).
    """
    digest = hashlib.blake2b(f"{PROBE_RULE}|{int(sample_index)}|{int(probe)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def probe_vectors(sample_index: int, natoms: int, num_probes: int, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """The probes of one sample, ``[natoms, 3, num_probes]`` float64 on the CPU.

    Args:
        sample_index: the sample's global dataset index.
        natoms: its atoms.
        num_probes: K.
        fixed: ``[natoms]`` bool, atoms held fixed (their rows are zero), or None.
    """
    # a generator per probe: torch's normal sampler draws differently for different sizes, so
    # one stream for all K would make probe k depend on K
    v = torch.stack([torch.randn(natoms, 3, generator=torch.Generator().manual_seed(probe_seed(sample_index, k)),
                                 dtype=torch.float64) for k in range(num_probes)], dim=-1)
    if fixed is not None:
        v[fixed.reshape(-1).bool().cpu()] = 0.0
    return v


def batch_probes(sample_indices: Sequence[int], natoms: Sequence[int], num_probes: int,
                 fixed: torch.Tensor | None = None) -> torch.Tensor:
    """The probes of a batch, the samples' :func:`probe_vectors` concatenated, ``[N, 3, K]``.

    Args:
        sample_indices: each sample's global dataset index.
        natoms: each sample's atoms.
        num_probes: K.
        fixed: ``[N]`` bool over the batch's atoms, or None.
    """
    parts = fixed.reshape(-1).split([int(n) for n in natoms]) if fixed is not None else [None] * len(natoms)
    return torch.cat([probe_vectors(i, n, num_probes, f) for i, n, f in zip(sample_indices, natoms, parts)])


def force_jacobian_products(forces: torch.Tensor, pos: torch.Tensor, probes: torch.Tensor, symmetric: bool,
                            create_graph: bool = False) -> torch.Tensor:
    """``−∂F/∂x · v`` for every probe: ``[N, 3, K]``.

    Structures of a batch do not interact, so the batch's Jacobian is block diagonal and one
    product over the whole batch gives every structure's at once.

    Args:
        forces: ``[N, 3]``, computed from ``pos`` with its autograd graph (gradient forces built
            with ``create_graph``).
        pos: ``[N, 3]`` the positions the forces were computed from (requires grad).
        probes: ``[N, 3, K]`` in the forces' dtype and device.
        symmetric: the forces are a gradient (``−∂E/∂x``), so their Jacobian is symmetric and a
            vjp gives the product; False (a direct force head): the double-vjp trick.
        create_graph: keep the graph of the products (training differentiates them again).

    Returns:
        The products, in the forces' units per unit of position (eV/Å² for eV/Å forces).
    """
    num = probes.shape[-1]
    grad = torch.autograd.grad
    out = []
    if symmetric:
        for k in range(num):
            (jt_v,) = grad(forces, pos, grad_outputs=probes[..., k], retain_graph=True, create_graph=create_graph,
                           materialize_grads=True)
            out.append(-jt_v)
    else:
        # u ↦ J^T u is linear in u; its vjp with v is J v (needs the graph of the first vjp)
        u = torch.zeros_like(forces, requires_grad=True)
        (jt_u,) = grad(forces, pos, grad_outputs=u, create_graph=True, materialize_grads=True)
        for k in range(num):
            (j_v,) = grad(jt_u, u, grad_outputs=probes[..., k], retain_graph=True, create_graph=create_graph,
                          materialize_grads=True)
            out.append(-j_v)
    return torch.stack(out, dim=-1)


def check_probe_rule(provenance: dict, where: str) -> int:
    """The number of probes of a store's ``hvp``, refusing one whose probes another rule made.

    Args:
        provenance: the store's attributes (``hessian`` is recorded by extraction).
        where: the store, for the message.

    Raises:
        ConfigError: no record of the probes, or another rule than :data:`PROBE_RULE`.
    """
    info = (provenance or {}).get("hessian") or {}
    if info.get("probes_from") != PROBE_RULE:
        raise ConfigError(f"{where}: its {K.HVP!r} targets were made with probes {info.get('probes_from')!r}, but this "
                          f"kdcache regenerates them as {PROBE_RULE!r}; extract the store again")
    return int(info["probes"])


def describe(num_probes: int) -> dict:
    """The store's record of its probes (attribute ``hessian``).

    Args:
        num_probes: K.
    """
    return {"probes": int(num_probes), "probes_from": PROBE_RULE, "unit": UNIT}
