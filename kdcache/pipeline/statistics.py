"""Statistics over seeds: what the report may claim about a distilled student.

Student training varies a lot from seed to seed, so one run per strategy cannot tell a gain
from noise. Every run of a recipe is repeated for each seed; then

* a metric is reported as mean ± sample standard deviation over seeds;
* gap closed is computed **per seed** against the baseline of the **same seed** (pairing removes
  the seed-to-seed variation the two runs share), over the gap of the mean baseline (see
  :func:`kdcache.pipeline.report.add_gaps`), and reported as mean ± standard error
  (``sd / sqrt(n)``);
* a gain counts only when the mean gap closed is above two standard errors
  (:data:`NOISE_SE`); anything else is marked as within noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

#: a gap closed counts as a gain when mean > NOISE_SE · standard error
NOISE_SE = 2.0


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and standard error of the finite values given.

    Args:
        mean: arithmetic mean (nan when no value is finite).
        sd: sample standard deviation (ddof 1; nan for fewer than two values).
        se: standard error of the mean, ``sd / sqrt(n)``.
        n: number of finite values used.
    """

    mean: float
    sd: float
    se: float
    n: int

    @property
    def beyond_noise(self) -> bool:
        """True when the mean is positive and above :data:`NOISE_SE` standard errors.

        A single value has no error estimate, so it is never beyond noise."""
        return self.n >= 2 and math.isfinite(self.se) and self.mean > NOISE_SE * self.se

    @property
    def verdict(self) -> str:
        """``gain`` (above two SE), ``worse`` (below minus two SE) or ``noise``."""
        if self.beyond_noise:
            return "gain"
        if self.n >= 2 and math.isfinite(self.se) and self.mean < -NOISE_SE * self.se:
            return "worse"
        return "noise"


def summarise(values: Iterable[float]) -> Summary:
    """:class:`Summary` of the finite values (nan/inf, e.g. a seed without a gap, are left out)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    mean = sum(vals) / n
    if n < 2:
        return Summary(mean, float("nan"), float("nan"), n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return Summary(mean, sd, sd / math.sqrt(n), n)


def gap_closed(baseline: float, distilled: float, teacher: float, higher_is_better: bool = False) -> float:
    """(baseline - distilled) / (baseline - teacher).

    ``nan`` when there is no gap: the teacher ties with the baseline or is worse than it (a ratio
    would then be large or negative for a student that is worse than the baseline).

    Args:
        baseline, distilled, teacher: one metric of the three models.
        higher_is_better: True for force cosine and EFwT.
    """
    den = baseline - teacher
    if not all(map(math.isfinite, (baseline, distilled, teacher))) or abs(den) < 1e-12 * max(1.0, abs(baseline)):
        return float("nan")
    teacher_better = teacher > baseline if higher_is_better else teacher < baseline
    if not teacher_better:
        return float("nan")
    return (baseline - distilled) / den


def paired_gaps(baseline: Sequence[float], distilled: Sequence[float], teacher: float | Sequence[float],
                higher_is_better: bool = False) -> list[float]:
    """Gap closed of each seed against the same seed's baseline, over the mean baseline's gap.

    Args:
        baseline: the baseline metric per seed.
        distilled: the distilled student's metric per seed (same seed order).
        teacher: the teacher's metric (one teacher serves every seed), or one per seed.
        higher_is_better: True for force cosine and EFwT.
    """
    if len(baseline) != len(distilled):
        raise ValueError(f"{len(baseline)} baseline seeds but {len(distilled)} distilled seeds")
    teachers = [teacher] * len(baseline) if isinstance(teacher, (int, float)) else list(teacher)
    mean_base, mean_teacher = sum(baseline) / len(baseline), sum(teachers) / len(teachers)
    if math.isnan(gap_closed(mean_base, mean_base, mean_teacher, higher_is_better)):
        return [float("nan")] * len(baseline)  # the teacher is not better than the baseline
    return [(b - d) / (mean_base - mean_teacher) for b, d in zip(baseline, distilled)]


def format_summary(s: Summary, scale: float = 1.0, digits: int = 1, pct: bool = False, error: str = "sd") -> str:
    """``12.3 ± 4.5`` (``error`` = ``sd`` or ``se``); ``+22.0 ± 5.0 %`` with ``pct``; ``n/a`` if empty."""
    if s.n == 0 or not math.isfinite(s.mean):
        return "n/a"
    err = s.sd if error == "sd" else s.se
    sign = "+" if pct else ""
    unit = " %" if pct else ""
    if not math.isfinite(err):
        return f"{s.mean * scale:{sign}.{digits}f}{unit}"
    return f"{s.mean * scale:{sign}.{digits}f} ± {err * scale:.{digits}f}{unit}"
