"""Distillation strategies: which student output meets which stored teacher target, and how.

Every strategy lives here, in one table (:data:`STRATEGIES`), so adding one is one entry plus (for
a new kind of target) one loss function. A run may combine strategies with weights
(``"n2n:100,v2v:10"``); ``none`` is the plain baseline without distillation.

Feature strategies compare ``M_s(H_s)`` with ``H_t``: a learned map ``M_s`` takes the student's
features to the teacher's width. For vector targets (``[N, 3, d]``) the map is linear, bias-free,
and mixes channels only, so it commutes with rotations and the loss is rotation invariant.

The ``hessian`` strategy has no map: the student's own Hessian-vector products (one more backward
through its forces, :mod:`kdcache.hessian`) meet the stored teacher's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kdcache import keys as K
from kdcache.errors import ConfigError


@dataclass(frozen=True)
class StrategySpec:
    """What one strategy needs.

    Args:
        name: strategy name.
        kind: ``"scalar"`` / ``"vector"`` feature matching, ``"labels"`` / ``"atom_energy"``, or
            ``"hessian"`` (Hessian-vector products, :mod:`kdcache.hessian`).
        student_feature: the key the student's forward must hand out (None: labels only).
        store_keys: candidate store keys in order of preference (the first present is used);
            ``vanilla1`` needs every one of them.
        needs_all: True when every store key is needed (not one of them).
        default_lambda: λ of the strategy when none is given (feature strategies: for the
            default scale-free loss, ``feature_norm: standard``; docs/strategies.md shows the
            runs that chose them).
        extract_option: the ``kdcache extract`` option that stores the target, for a target
            that is no ``--features`` name (None: ``--features``).
    """

    name: str
    kind: str
    student_feature: str | None
    store_keys: tuple[str, ...]
    needs_all: bool = False
    default_lambda: float = 1.0
    extract_option: str | None = None

    @property
    def standardized(self) -> bool:
        """Its stored target is standardised under ``feature_norm: standard`` (by the store's
        statistics of it): the feature targets and the Hessian-vector products."""
        return self.kind in ("scalar", "vector", "hessian")

    @property
    def differentiates_forces(self) -> bool:
        """Its loss differentiates the student's forces with respect to positions (a double
        backward through gradient forces): the Hessian-vector products. The compiled student
        (``fast``) cannot (:mod:`kdcache.models.fast`)."""
        return self.kind == "hessian"


#: The one strategy table: the recipe checker, the pipeline's store features, the trainer and
#: ``kdcache extract --features``'s help all read it (with each teacher model class's
#: ``available_features``, see :func:`teacher_features`).
STRATEGIES: dict[str, StrategySpec] = {
    "n2n": StrategySpec("n2n", "scalar", K.NODE, (K.NODE,), default_lambda=30.0),
    "e2n": StrategySpec("e2n", "scalar", K.NODE, (K.E2N,), default_lambda=3.0),
    # v2v: the target is made in kdcache/features.py (aggregate_edge_features): e2v = Σ over the
    # edges into an atom of unit edge vector ⊗ edge feature, from an edge-feature teacher
    # (GemNet-OC); a PaiNN teacher (no edge features) stores its own vector features instead.
    # A store holds the one its teacher's kind offers (candidate_keys); e2v for an unknown kind.
    "v2v": StrategySpec("v2v", "vector", K.VECTOR, (K.E2V, K.VECTOR), default_lambda=30.0),
    "vanilla1": StrategySpec("vanilla1", "labels", None, (K.ENERGY, K.FORCES), needs_all=True, default_lambda=1.0),
    # per-atom energies in normalised units are small (~std/natoms): a weight of order 100
    "vanilla2": StrategySpec("vanilla2", "atom_energy", None, (K.ATOM_ENERGY,), default_lambda=100.0),
    # the student's −∂F/∂x·v for the stored probes (kdcache/hessian.py) against the teacher's; the
    # standardised term is ≈ 1/3 per component for an uninformed student, like v2v's, and λ = 10
    # is a first guess below the feature strategies' 30, not swept; measured once, on teacher-
    # labelled candidates (pipelines/synthetic-model.yaml): a further force gain beyond noise
    "hessian": StrategySpec("hessian", "hessian", None, (K.HVP,), default_lambda=10.0,
                            extract_option="--hessian-probes K"),
}
STRATEGY_NAMES = ("none",) + tuple(STRATEGIES)
FEATURE_LOSSES = ("mse", "mae", "huber")
STUDENT_MAPS = ("linear", "identity", "mlp")


@dataclass(frozen=True)
class Term:
    """One weighted strategy of a run (``name`` in :data:`STRATEGIES`)."""

    name: str
    weight: float

    @property
    def spec(self) -> StrategySpec:
        return STRATEGIES[self.name]


def _one_term(item, default_weight: float | None) -> Term | None:
    if isinstance(item, Mapping):
        if set(item) >= {"name"}:
            name, weight = item["name"], item.get("weight", default_weight)
        elif len(item) == 1:
            ((name, weight),) = item.items()
        else:
            raise ConfigError(f"strategy entry {dict(item)!r}: expected {{name: ..., weight: ...}} or {{name: weight}}")
    else:
        text = str(item).strip()
        name, _, weight = text.partition(":")
        weight = weight if weight else default_weight
    name = str(name).strip().lower()
    if name not in STRATEGY_NAMES:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGY_NAMES)}")
    if name == "none":
        return None
    if weight is None:
        weight = STRATEGIES[name].default_lambda
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise ConfigError(f"strategy {name!r}: weight {weight!r} is not a number") from None
    if name == "none":
        return None
    if weight < 0:
        raise ConfigError(f"strategy {name!r}: weight {weight} is negative")
    return Term(name, weight)


def parse_strategy(spec, default_weight: float | None = None) -> list[Term]:
    """Parse ``"v2v"``, ``"n2n:100,v2v:10"``, a YAML list of such strings or of
    ``{name: weight}`` / ``{name:, weight:}`` mappings. ``none`` (or empty) gives ``[]``.

    Args:
        spec: the strategy as given by the user.
        default_weight: weight of a strategy named without one (``--lambda``); None: each
            strategy's own ``default_lambda``.
    """
    if spec is None:
        return []
    items: Iterable = spec.split(",") if isinstance(spec, str) else (spec if isinstance(spec, (list, tuple)) else [spec])
    terms: list[Term] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        term = _one_term(item, default_weight)
        if term is None:
            continue
        if any(t.name == term.name for t in terms):
            raise ConfigError(f"strategy {term.name!r} given twice")
        terms.append(term)
    return terms


def format_strategy(terms: list[Term]) -> str:
    return ",".join(f"{t.name}:{t.weight:g}" for t in terms) or "none"


# --- which store key serves a strategy -------------------------------------------------------
def teacher_kind(name: str | None) -> str | None:
    """The model registry name (``gemnet_oc``, ``painn``, ``schnet``) of a teacher: the one place a
    teacher's kind is decided.

    Args:
        name: what names the teacher: a store's provenance ``teacher.name``, a checkpoint's model
            name or a preset (``gemnet-oc-tiny``).

    Returns:
        The registry name, or None for anything else (an ASE calculator, no name).
    """
    from kdcache.models import MODEL_CLASSES

    text = str(name or "").lower().replace("-", "_")
    for kind in sorted(MODEL_CLASSES, key=len, reverse=True):  # `painn_big` is a painn
        if text == kind or text.startswith(kind + "_"):
            return kind
    return None


def _offered(kind: str | None, load: bool = True) -> tuple[str, ...]:
    """Hidden features a teacher of ``kind`` hands out (its model class's ``available_features``).

    Args:
        kind: a :func:`teacher_kind`, or None (nothing known).
        load: import the model's module to ask; False asks only a module already imported
            (stage two never imports a teacher's code: its student's module is there, and a
            store holds the target its teacher offers, so this only orders synthetic stores).
    """
    if kind is None:
        return ()
    from kdcache.models import MODEL_CLASSES, model_class

    if not load and sys.modules.get(MODEL_CLASSES[kind].split(":")[0]) is None:
        return ()
    return tuple(model_class(kind).available_features)


def candidate_keys(spec: StrategySpec, kind: str | None, load: bool = True) -> list[str]:
    """A strategy's store keys in the order they are tried: those a teacher of ``kind`` offers
    first (a PaiNN teacher's v2v target is its ``vector``), then the table's order.

    Args:
        spec: the strategy.
        kind: the teacher's :func:`teacher_kind` (None: unknown).
        load: see :func:`_offered`.
    """
    offered = _offered(kind, load)
    return sorted(spec.store_keys, key=lambda k: k in K.FEATURE_KEYS and k not in offered)


def feature_name(store_key: str) -> str:
    """The ``kdcache extract --features`` name that stores a key (energy and forces: ``outputs``)."""
    from kdcache.store.format import OUTPUTS

    return OUTPUTS if store_key in (K.ENERGY, K.FORCES) else store_key


def teacher_features(kind: str | None) -> tuple[str, ...] | None:
    """The ``--features`` a teacher of ``kind`` can store (its hidden features, per-atom energies
    and outputs), in ``--features`` order; None when the kind is unknown."""
    if kind is None:
        return None
    from kdcache.store.format import FEATURE_CHOICES

    offered = set(_offered(kind)) | {K.ATOM_ENERGY, feature_name(K.ENERGY)}
    return tuple(f for f in FEATURE_CHOICES if f in offered)


def needed_features(strategy: str, kind: str | None) -> tuple[str, ...]:
    """The ``--features`` a strategy reads from a store of a teacher of ``kind`` (None: unknown)."""
    spec = STRATEGIES[strategy]
    if spec.extract_option is not None:  # stored by its own option, not by --features
        return ()
    keys = spec.store_keys if spec.needs_all else candidate_keys(spec, kind)[:1]
    return tuple(dict.fromkeys(feature_name(k) for k in keys))


def store_features_help() -> str:
    """Each ``kdcache extract --features`` name with the strategies that read it, e.g.
    ``node (n2n), e2n (e2n), ..., outputs (vanilla1)``."""
    from kdcache.store.format import FEATURE_CHOICES

    readers = {f: [n for n, s in STRATEGIES.items() if f in map(feature_name, s.store_keys)] for f in FEATURE_CHOICES}
    return ", ".join(f"{f} ({', '.join(r)})" if r else f for f, r in readers.items())


def resolve_store_keys(
    terms: list[Term],
    store_keys: Iterable[str] | None,
    teacher_name: str | None = None,
    store_path: str = "the store",
) -> dict[str, tuple[str, ...]]:
    """Map each strategy to the store key(s) it reads; refuse what the store cannot serve.

    Args:
        terms: the run's strategies.
        store_keys: the keys the store holds (None: no store).
        teacher_name: the store's provenance teacher name: its kind (:func:`teacher_kind`)
            orders a strategy's candidate keys (:func:`candidate_keys`, without importing the
            teacher's code).
        store_path: the store, for messages.

    Raises:
        ConfigError: a strategy needs a target the store does not hold (or there is no store).
    """
    out: dict[str, tuple[str, ...]] = {}
    if not terms:
        return out
    if store_keys is None:
        raise ConfigError(f"strategy {format_strategy(terms)} needs a feature store (--store)")
    have = set(store_keys)
    kind = teacher_kind(teacher_name)
    for term in terms:
        spec = term.spec
        if spec.needs_all:
            missing = [k for k in spec.store_keys if k not in have]
            if missing:
                raise ConfigError(
                    f"strategy {term.name!r} needs stored teacher {missing} but {store_path} holds "
                    f"{sorted(have)}; re-extract with those targets"
                )
            out[term.name] = spec.store_keys
            continue
        found = [k for k in candidate_keys(spec, kind, load=False) if k in have]
        if not found:
            teacher = f" (teacher {teacher_name})" if teacher_name else ""
            how = f"; extract with {spec.extract_option}" if spec.extract_option else ""
            raise ConfigError(
                f"strategy {term.name!r} needs stored teacher {' or '.join(spec.store_keys)} but "
                f"{store_path}{teacher} holds {sorted(have)}{how}"
            )
        out[term.name] = (found[0],)
    return out


def check_student(terms: list[Term], student) -> None:
    """Refuse strategies whose student feature the student architecture lacks."""
    offered = tuple(getattr(student, "available_features", ()))
    for term in terms:
        feat = term.spec.student_feature
        if feat is not None and feat not in offered:
            raise ConfigError(
                f"strategy {term.name!r} needs student feature {feat!r}, but student "
                f"{getattr(student, 'name', type(student).__name__)!r} offers {list(offered)}"
            )


# --- student maps ---------------------------------------------------------------------------
class VectorLinear(nn.Module):
    """Bias-free channel mixing of ``[N, 3, d_in] -> [N, 3, d_out]``: commutes with rotations.

    Args:
        d_in: student channels.
        d_out: teacher channels.
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # acts on the last (channel) axis only


def build_map(kind: str, name: str, d_student: int, d_teacher: int, term: str = "") -> nn.Module:
    """A student map ``M_s`` for one feature strategy.

    Args:
        kind: ``"scalar"`` or ``"vector"``.
        name: ``linear`` (default), ``identity`` or ``mlp`` (scalar targets only).
        d_student: student feature width.
        d_teacher: teacher feature width.
        term: strategy name (for messages).
    """
    if name not in STUDENT_MAPS:
        raise ConfigError(f"unknown student map {name!r}; known: {', '.join(STUDENT_MAPS)}")
    if name == "identity":
        if d_student != d_teacher:
            raise ConfigError(
                f"strategy {term!r}: student map 'identity' needs equal widths, but the student has "
                f"{d_student} channels and the teacher {d_teacher}; use --student-map linear"
            )
        return nn.Identity()
    if kind == "vector":
        if name == "mlp":
            # a nonlinearity on vector components would break rotation equivariance
            raise ConfigError(f"strategy {term!r}: student map 'mlp' works on scalar features only; use linear")
        return VectorLinear(d_student, d_teacher)
    if name == "mlp":
        return nn.Sequential(nn.Linear(d_student, d_student), nn.SiLU(), nn.Linear(d_student, d_teacher))
    return nn.Linear(d_student, d_teacher)


# --- losses ---------------------------------------------------------------------------------
def feature_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "mse":
        return F.mse_loss
    if name == "mae":
        return F.l1_loss
    if name == "huber":
        return F.huber_loss
    raise ConfigError(f"unknown feature loss {name!r}; known: {', '.join(FEATURE_LOSSES)}")


def energy_mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).abs().mean()


def force_l2mae(pred: torch.Tensor, target: torch.Tensor, free: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (free) atoms of the L2 norm of the per-atom force error (the reference 'l2mae')."""
    err = torch.linalg.vector_norm(pred - target, dim=-1)
    if free is not None:
        err = err[free]
    if err.numel() == 0:
        return pred.sum() * 0.0
    return err.mean()


def free_atom_mask(batch) -> torch.Tensor | None:
    """Atoms that carry a force loss: all but those the data mark fixed (None: all atoms)."""
    fixed = batch.get(K.FIXED) if hasattr(batch, "get") else getattr(batch, K.FIXED, None)
    if fixed is None:
        return None
    return ~fixed.bool()
