"""Exact per-channel statistics of stored targets, streamed during extraction.

Stage two standardises every feature target with these numbers (``feature_norm: standard``), so
that a feature loss is about 1 for an uninformed student whatever the teacher's feature scale,
and λ weighs it against the normalised label loss directly.

What is kept per array (always over the atoms of stored samples, never the shard padding):

* scalar features ``[A, d]`` (``node``, ``e2n``): per-channel mean and standard deviation;
* vector features ``[A, 3, d]`` (``e2v``, ``vector``) and Hessian-vector products ``[A, 3, K]``
  (``hvp``, one channel per probe): per-channel RMS norm
  ``sqrt(mean_atoms |v|²)``, with **no shift**: subtracting a mean vector would break rotation
  equivariance, and dividing by a per-channel scalar keeps it;
* per-atom energies ``[A]``: mean and standard deviation.

Sums are float64 and merge exactly in the pairwise form of Chan et al. (count, mean, M2), so a
store's statistics do not depend on how extraction was split into groups or ranks: the writer
keeps one :class:`RunningStats` per group and merges them in group order at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdcache import keys as K

#: how each stored array is summarised
SCALAR_KEYS = (K.NODE, K.E2N, K.ATOM_ENERGY)
VECTOR_KEYS = (K.E2V, K.VECTOR, K.HVP)
STATS_KEYS = SCALAR_KEYS + VECTOR_KEYS
#: a channel whose spread is below this is treated as constant (scale 1, so it is not blown up)
MIN_SCALE = 1e-8


@dataclass
class RunningStats:
    """Mergeable count / mean / M2 (scalar) or count / mean square norm (vector) per channel.

    Args:
        kind: ``"scalar"`` or ``"vector"``.
        count: rows (atoms) seen.
        mean: ``[d]`` per-channel mean (scalar) or mean squared norm (vector).
        m2: ``[d]`` per-channel sum of squared deviations from ``mean`` (scalar only).
    """

    kind: str
    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    @classmethod
    def of(cls, key: str, rows: np.ndarray) -> "RunningStats":
        """Statistics of one block of stored rows (``[n]``, ``[n, d]`` or ``[n, 3, d]``)."""
        kind = "vector" if key in VECTOR_KEYS else "scalar"
        x = np.asarray(rows, dtype=np.float64)
        if kind == "vector":
            sq = (x * x).sum(axis=1)  # [n, d] squared norms
            return cls(kind, int(x.shape[0]), sq.mean(axis=0) if len(x) else np.zeros(x.shape[-1]), None)
        x = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        if not len(x):
            return cls(kind, 0, np.zeros(x.shape[1]), np.zeros(x.shape[1]))
        mean = x.mean(axis=0)
        return cls(kind, int(x.shape[0]), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: "RunningStats") -> "RunningStats":
        """The statistics of both blocks together (Chan et al.'s pairwise update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = None
        if self.kind == "scalar":
            m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return RunningStats(self.kind, n, mean, m2)

    def summary(self) -> dict:
        """Plain data for the store's attributes: ``mean``/``std`` or ``rms`` per channel."""
        if self.kind == "vector":
            return {"kind": "vector", "count": self.count, "rms": np.sqrt(self.mean).tolist()}
        std = np.sqrt(self.m2 / max(self.count, 1))
        return {"kind": "scalar", "count": self.count, "mean": self.mean.tolist(), "std": std.tolist()}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Exact float64 state, for a group's record on disk (resume keeps exactness)."""
        out = {"count": np.asarray(self.count, dtype=np.int64), "mean": np.asarray(self.mean, dtype=np.float64)}
        if self.m2 is not None:
            out["m2"] = np.asarray(self.m2, dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, key: str, arrays: dict) -> "RunningStats":
        kind = "vector" if key in VECTOR_KEYS else "scalar"
        m2 = np.asarray(arrays["m2"], dtype=np.float64) if "m2" in arrays else None
        return cls(kind, int(arrays["count"]), np.asarray(arrays["mean"], dtype=np.float64), m2)


def merge_all(parts: list[RunningStats]) -> RunningStats | None:
    """Merge in the given order (the writer passes group order, so the result is reproducible)."""
    total = None
    for p in parts:
        total = p if total is None else total.merge(p)
    return total


@dataclass(frozen=True)
class Standardizer:
    """The shift and scale that ``feature_norm: standard`` applies to one stored target.

    Args:
        key: store key.
        shift: ``[d]`` subtracted (zeros for vector targets).
        scale: ``[d]`` divided by (std, or RMS norm for vectors; 1 for constant channels).
    """

    key: str
    shift: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)

    @classmethod
    def from_summary(cls, key: str, summary: dict) -> "Standardizer":
        if summary["kind"] == "vector":
            scale = np.asarray(summary["rms"], dtype=np.float64)
            shift = np.zeros_like(scale)
        else:
            scale = np.asarray(summary["std"], dtype=np.float64)
            shift = np.asarray(summary["mean"], dtype=np.float64)
        # a dead channel (all zeros, e.g. an unused edge feature) carries no signal to match
        scale = np.where(scale > MIN_SCALE, scale, 1.0)
        return cls(key, shift, scale)
