"""The training objective: student + student maps, labels loss plus weighted distillation terms.

L = a_E·MAE(E) + a_F·L2MAE(F) + Σ_k λ_k·L_k, all in the student's normalised units (energies
``(E - Σ ref[Z] - mean)/std``, forces ``F/std``), as in the reference training. Teacher energies, forces and
per-atom energies are stored in physical units and go through the *same* normaliser. The
``hessian`` term differentiates the student's forces once more along the batch's probes, so its
positions are made a leaf that requires grad before the student runs.

Everything that has parameters (student and maps) sits in one module whose ``forward`` returns
the losses, so DDP wraps a single module and EMA tracks a single parameter list.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcache import keys as K
from kdcache.errors import ConfigError
from kdcache.hessian import force_jacobian_products
from kdcache.train.data import target_key
from kdcache.train.strategies import (
    Term,
    build_map,
    energy_mae,
    feature_loss_fn,
    force_l2mae,
    free_atom_mask,
)


class DistillationObjective(nn.Module):
    """Student plus maps; ``forward(batch)`` returns ``{"loss", "energy", "forces", <strategy>...}``.

    Args:
        student: a :class:`kdcache.models.base.PotentialModel`.
        terms: the run's weighted strategies.
        store_keys: strategy name -> store key(s) it reads (from ``resolve_store_keys``).
        maps: strategy name -> student map (feature strategies only).
        feature_loss: ``mse``, ``mae`` or ``huber``.
        energy_coef: a_E.
        force_coef: a_F.
        standardizers: strategy name -> :class:`kdcache.store.stats.Standardizer` of its stored
            target (``feature_norm: standard``); a feature strategy without one compares raw
            values (``feature_norm: none``, the paper's loss).
    """

    def __init__(
        self,
        student: nn.Module,
        terms: list[Term],
        store_keys: dict[str, tuple[str, ...]],
        maps: dict[str, nn.Module] | None = None,
        feature_loss: str = "mse",
        energy_coef: float = 1.0,
        force_coef: float = 100.0,
        standardizers: dict | None = None,
    ):
        super().__init__()
        self.student = student
        self.terms = list(terms)
        self.store_keys = dict(store_keys)
        self.maps = nn.ModuleDict(maps or {})
        self.feature_loss = feature_loss_fn(feature_loss)
        self.energy_coef = float(energy_coef)
        self.force_coef = float(force_coef)
        self.features = tuple(sorted({t.spec.student_feature for t in self.terms if t.spec.student_feature}))
        # not persistent: they come from the store, so a checkpoint stays a student + its maps
        self._standardized = set()
        for name, st in (standardizers or {}).items():
            self.register_buffer(f"shift_{name}", torch.as_tensor(st.shift, dtype=torch.float32), persistent=False)
            self.register_buffer(f"scale_{name}", torch.as_tensor(st.scale, dtype=torch.float32), persistent=False)
            self._standardized.add(name)

    # --- pieces ---------------------------------------------------------------------------
    def term_loss(self, term: Term, out: dict, batch, free: torch.Tensor | None) -> torch.Tensor:
        spec, norm = term.spec, self.student.normalizer
        if spec.kind in ("scalar", "vector"):
            target = batch[target_key(self.store_keys[term.name][0])]
            mapped = self.maps[term.name](out[spec.student_feature])
            target = target.to(mapped.dtype)
            if term.name in self._standardized:
                # (H_t - shift) / scale per channel; vectors have no shift, so this commutes
                # with rotations and the loss stays invariant
                shift = getattr(self, f"shift_{term.name}").to(mapped.dtype)
                scale = getattr(self, f"scale_{term.name}").to(mapped.dtype)
                target = (target - shift) / scale
            return self.feature_loss(mapped, target)
        if spec.kind == "labels":  # vanilla1: teacher energy and forces as extra labels
            _, ref_sum = norm.batch_reference(batch, out[K.ENERGY].dtype)
            e_t = norm.norm_energy(batch[target_key(K.ENERGY)].to(out[K.ENERGY].dtype), ref_sum)
            f_t = norm.norm_forces(batch[target_key(K.FORCES)].to(out[K.FORCES].dtype))
            return self.energy_coef * energy_mae(out[K.ENERGY], e_t) + self.force_coef * force_l2mae(
                out[K.FORCES], f_t, free
            )
        if spec.kind == "hessian":
            return self.hessian_loss(term, out, batch, free)
        if spec.kind == "atom_energy":  # vanilla2: per-atom energies, normalised like the sum
            pred = out[K.ATOM_ENERGY]
            ae = batch[target_key(K.ATOM_ENERGY)].to(pred.dtype)
            per_atom_n = batch[K.NATOMS][batch[K.BATCH]].to(pred.dtype)
            atom_ref, _ = norm.batch_reference(batch, pred.dtype)
            ae_norm = norm.norm_atom_energy(ae, per_atom_n, atom_ref)
            return torch.mean((pred - ae_norm) ** 2)
        raise ConfigError(f"strategy {term.name!r}: unknown kind {spec.kind!r}")  # pragma: no cover

    def hessian_loss(self, term: Term, out: dict, batch, free: torch.Tensor | None) -> torch.Tensor:
        """The student's ``−∂F/∂x · v`` for the batch's probes against the stored teacher's, over
        the free atoms' rows, with the feature loss. Standardised (``feature_norm: standard``):
        both in eV/Å² divided by the stored per-probe RMS norm (a scalar per probe: rotation
        invariant); otherwise both in the student's normalised force units (``/std``).

        Args:
            term: the ``hessian`` term.
            out: the student's outputs (forces with their graph).
            batch: the batch (positions a leaf that requires grad, ``hvp_probes``, ``kd_hvp``).
            free: the free atoms, or None.
        """
        student, norm = self.student, self.student.normalizer
        forces = out[K.FORCES]
        probes = batch[K.HVP_PROBES].to(forces.dtype)
        # raw (normalised) forces, so these are the products in normalised units
        pred = force_jacobian_products(forces, batch[K.POSITIONS], probes, student.gradient_forces, create_graph=True)
        target = batch[target_key(self.store_keys[term.name][0])].to(pred.dtype)
        if term.name in self._standardized:
            scale = getattr(self, f"scale_{term.name}").to(pred.dtype)
            pred, target = norm.denorm_forces(pred) / scale, target / scale
        else:
            target = norm.norm_forces(target)
        if free is not None:
            pred, target = pred[free], target[free]
        return self.feature_loss(pred, target)

    def label_losses(self, out: dict, batch, free: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Energy MAE and force L2MAE against the batch's ``energy``/``forces``: the training
        labels, which are the dataset's or, with ``labels: teacher|both``, the teacher's (chosen
        per sample where the batch is loaded, :func:`kdcache.train.data.apply_label_source`)."""
        norm = self.student.normalizer
        _, ref_sum = norm.batch_reference(batch, out[K.ENERGY].dtype)
        e_t = norm.norm_energy(batch[K.ENERGY].to(out[K.ENERGY].dtype), ref_sum)
        f_t = norm.norm_forces(batch[K.FORCES].to(out[K.FORCES].dtype))
        return {K.ENERGY: energy_mae(out[K.ENERGY], e_t), K.FORCES: force_l2mae(out[K.FORCES], f_t, free)}

    def forward(self, batch) -> dict[str, torch.Tensor]:
        if any(t.spec.kind == "hessian" for t in self.terms):
            batch[K.POSITIONS] = batch[K.POSITIONS].detach().requires_grad_(True)
        out = self.student(batch, features=self.features)
        free = free_atom_mask(batch)
        parts = self.label_losses(out, batch, free)
        loss = self.energy_coef * parts[K.ENERGY] + self.force_coef * parts[K.FORCES]
        for term in self.terms:
            value = self.term_loss(term, out, batch, free)
            parts[term.name] = value
            loss = loss + term.weight * value
        parts["loss"] = loss
        return parts


def feature_widths(student: nn.Module, batch, terms: list[Term], store_keys: dict) -> dict[str, tuple[int, int]]:
    """(student width, teacher width) of each feature strategy, from one forward on ``batch``."""
    feats = tuple(sorted({t.spec.student_feature for t in terms if t.spec.student_feature}))
    if not feats:
        return {}
    with torch.enable_grad():  # gradient-force students need autograd even here
        out = student(batch, features=feats)
    widths = {}
    for t in terms:
        if t.spec.student_feature is None:
            continue
        s = out[t.spec.student_feature]
        tgt = batch[target_key(store_keys[t.name][0])]
        if t.spec.kind == "vector" and (tgt.dim() != 3 or tgt.shape[1] != 3):
            raise ConfigError(f"strategy {t.name!r}: stored target has shape {tuple(tgt.shape)}, expected [atoms, 3, d]")
        if tgt.shape[0] != s.shape[0]:
            raise ConfigError(
                f"strategy {t.name!r}: {tgt.shape[0]} stored target rows for {s.shape[0]} atoms in a batch"
            )
        widths[t.name] = (int(s.shape[-1]), int(tgt.shape[-1]))
    return widths


def build_maps(terms: list[Term], widths: dict[str, tuple[int, int]], map_name: str) -> dict[str, nn.Module]:
    return {
        t.name: build_map(t.spec.kind, map_name, *widths[t.name], term=t.name)
        for t in terms
        if t.spec.kind in ("scalar", "vector")
    }
