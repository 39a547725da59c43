"""The pipeline's report: one table per configuration, as the paper's Table 1.

For every distilled student and every metric the report gives the share of the student–teacher
gap that distillation closes::

    gap closed = (baseline - distilled) / (baseline - teacher)

The same formula serves errors (lower is better) and force cosine / EFwT (higher is better):
100 % means the student matches the teacher, 0 % the baseline, negative values a student worse
than the baseline.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

# gap_closed lives with the statistics that pair it over seeds; the report names it too
from kdcache.pipeline.statistics import NOISE_SE, format_summary, gap_closed, paired_gaps, summarise  # noqa: F401

#: metrics of ``kdcache eval`` in report order: (key, header, unit, digits); EFwT comes as a
#: fraction and is shown in % (the CSV keeps the fraction, as ``kdcache eval --json`` gives it)
METRICS = (
    ("energy_mae", "Energy MAE", "meV", 1),
    ("force_mae", "Force MAE", "meV/Å", 2),
    ("force_cos", "Force cos", "", 4),
    ("efwt", "EFwT", "%", 2),
)
_SCALE = {"efwt": 100.0}
GAP_METRICS = tuple(m[0] for m in METRICS)
#: metrics where a larger value is better (the others are errors)
HIGHER_IS_BETTER = ("force_cos", "efwt")
NO_GAP_NOTE = ("n/a: the teacher is not better than the baseline on this metric, so there is no gap "
               "to close (train the teacher longer, or the students less).")
THROUGHPUT = ("samples_per_s", "Throughput", "samples/s", 1)


@dataclass
class Row:
    """One model of a configuration.

    Args:
        name: run name (``teacher``, ``baseline`` or the strategy's run name).
        kind: ``teacher``, ``baseline`` or ``distilled``.
        metrics: ``kdcache eval`` metrics (energy_mae meV, force_mae meV/Å, force_cos, efwt as a
            fraction, samples_per_s).
        strategy: e.g. ``v2v (λ=1)``; empty for teacher and baseline.
        model: preset or architecture, for the table.
        per_seed: the metrics of each seed's run, in the recipe's seed order (empty: one run,
            ``metrics``); ``metrics`` then holds their means.
        seeds: the seeds of ``per_seed``.

    Filled by :func:`add_gaps`: ``gap`` (metric -> mean gap closed), ``gap_stats`` (metric ->
    :class:`~kdcache.pipeline.statistics.Summary` of the per-seed gaps, paired with the same
    seed's baseline) and ``metric_stats`` (metric -> Summary over seeds).
    """

    name: str
    kind: str
    metrics: dict
    strategy: str = ""
    model: str = ""
    gap: dict = field(default_factory=dict)
    per_seed: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    gap_stats: dict = field(default_factory=dict)
    metric_stats: dict = field(default_factory=dict)

    @classmethod
    def over_seeds(cls, name: str, kind: str, per_seed: list[dict], seeds: list[int], **kw) -> "Row":
        """A row whose ``metrics`` are the means of several seeds' metrics."""
        keys = [k for k in per_seed[0] if all(isinstance(m.get(k), (int, float)) for m in per_seed)]
        means = {k: sum(float(m[k]) for m in per_seed) / len(per_seed) for k in keys}
        return cls(name, kind, means, per_seed=list(per_seed), seeds=list(seeds), **kw)

    @property
    def runs(self) -> list[dict]:
        """Per-run metrics (one entry for a single run)."""
        return self.per_seed or [self.metrics]

    @property
    def num_seeds(self) -> int:
        return len(self.runs)


def add_gaps(rows: list[Row]) -> list[Row]:
    """Fill ``gap``, ``gap_stats`` and ``metric_stats`` of every row.

    Gap closed is computed per seed against the baseline of the same seed (the seeds pair up in
    order): ``(baseline_s - distilled_s) / (mean_s baseline_s - teacher)``. The numerator is paired,
    which removes the seed-to-seed variation that both runs share; the denominator is the gap of
    the mean baseline, the same for every seed, because a single seed's gap can be close to zero
    (a lucky baseline) and its ratio then explodes. The mean over seeds is the gap closed of the
    mean metrics; ``gap`` holds it, ``gap_stats`` its spread (standard error over seeds).
    """
    teacher = next((r for r in rows if r.kind == "teacher"), None)
    baseline = next((r for r in rows if r.kind == "baseline"), None)
    for r in rows:
        r.gap, r.gap_stats = {}, {}
        r.metric_stats = {k: summarise(float(m[k]) for m in r.runs if k in m) for k in r.metrics}
        if teacher is None or baseline is None or r.kind == "teacher":
            continue
        base_runs = baseline.runs
        if len(base_runs) != len(r.runs):
            raise ValueError(f"run {r.name!r} has {len(r.runs)} seeds, the baseline {len(base_runs)}")
        for m in GAP_METRICS:
            if not (m in r.metrics and m in teacher.metrics and m in baseline.metrics):
                continue
            per_seed = paired_gaps([float(b[m]) for b in base_runs], [float(d[m]) for d in r.runs],
                                   float(teacher.metrics[m]), higher_is_better=m in HIGHER_IS_BETTER)
            r.gap_stats[m] = summarise(per_seed)
            r.gap[m] = per_seed[0] if len(per_seed) == 1 else r.gap_stats[m].mean
    return rows


def against(rows: list[Row], name: str) -> list[Row]:
    """The rows with run ``name`` in the baseline's place: gap closed of every other distilled
    run against ``name`` of the same seed (``(name_s - run_s) / (mean name - teacher)``), e.g.
    a distillation term on teacher labels against the teacher labels alone. The baseline row is
    left out; metrics are unchanged.

    Args:
        rows: the report's rows (teacher, baseline, distilled runs).
        name: a distilled run's name.
    """
    import copy

    out = []
    for r in rows:
        if r.kind == "baseline":
            continue
        r = copy.copy(r)
        if r.name == name:
            r.kind = "baseline"
        out.append(r)
    if not any(r.kind == "baseline" for r in out):
        raise ValueError(f"no run {name!r} among {[r.name for r in rows]}")
    return add_gaps(out)


def _several_seeds(rows: list[Row]) -> bool:
    return any(r.num_seeds > 1 for r in rows)


def _fmt(v, digits: int, key: str = "") -> str:
    if v is None:
        return "–"
    v = float(v) * _SCALE.get(key, 1.0)
    if math.isnan(v):
        return "n/a"
    return f"{v:.{digits}f}"


def _fmt_pct(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{100 * v:+.1f}%"


#: marks of a gap closed over several seeds
GAIN_MARK, NOISE_MARK, WORSE_MARK = "*", "~", "!"
NOISE_LEGEND = (f"Gap closed over seeds: mean ± standard error of the per-seed gaps (each seed's distilled "
                f"run against the baseline of the same seed, over the mean baseline's gap to the teacher). {GAIN_MARK} a gain above {NOISE_SE:g} standard errors; "
                f"{NOISE_MARK} within noise (not above {NOISE_SE:g} SE); {WORSE_MARK} worse than the baseline "
                f"beyond {NOISE_SE:g} SE. Metrics: mean ± standard deviation over seeds.")
SINGLE_SEED_NOTE = ("One seed per run: there is no estimate of seed-to-seed noise, so no gap closed here is "
                    "known to be beyond noise (give `seeds: [0, 1, 2]` in the recipe).")


def _gap_cell(r: Row, key: str) -> str:
    """One gap-closed cell: ``+50.0%`` for one seed, ``+22.0 ± 5.0 % *`` over several."""
    st = r.gap_stats.get(key)
    if st is None or r.num_seeds == 1:
        return _fmt_pct(r.gap.get(key))
    if st.n == 0:
        return "n/a"
    mark = {"gain": GAIN_MARK, "noise": NOISE_MARK, "worse": WORSE_MARK}[st.verdict]
    return f"{format_summary(st, scale=100, pct=True, error='se')} {mark}"


def _metric_cell(r: Row, key: str, digits: int) -> str:
    st = r.metric_stats.get(key)
    if st is None or r.num_seeds == 1 or key == THROUGHPUT[0]:
        return _fmt(r.metrics.get(key), digits, key)
    return format_summary(st, scale=_SCALE.get(key, 1.0), digits=digits, error="sd")


def has_no_gap(rows: list[Row]) -> bool:
    return any(isinstance(v, float) and math.isnan(v) for r in rows if r.kind == "distilled" for v in r.gap.values())


def markdown_table(rows: list[Row]) -> str:
    head = ["Model", "Strategy"]
    head += [f"{h} ({u})" if u else h for _, h, u, _ in METRICS]
    head += [f"{THROUGHPUT[1]} ({THROUGHPUT[2]})"]
    head += [f"gap closed: {h}" for _, h, _, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r.name}" + (f" ({r.model})" if r.model else ""), r.strategy or ("–" if r.kind != "baseline" else "none")]
        cells += [_metric_cell(r, k, d) for k, _, _, d in METRICS]
        cells += [_fmt(r.metrics.get(THROUGHPUT[0]), THROUGHPUT[3])]
        cells += [_gap_cell(r, k) if r.kind == "distilled" else "" for k, _, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table_text(rows: list[Row], title: str = "") -> str:
    """A plain-text table for the terminal: metrics and gap closed per distilled student."""
    several = _several_seeds(rows)
    wide = 10 if several else 0  # room for "± sd" / "± se *"
    cols = [("run", 14), ("E MAE meV", 10 + wide), ("F MAE meV/Å", 12 + wide), ("F cos", 7 + wide),
            ("EFwT %", 7 + wide), ("samples/s", 10), ("gap E", 8 + wide), ("gap F", 8 + wide),
            ("gap cos", 8 + wide), ("gap EFwT", 9 + wide)]
    out = []
    if title:
        out.append(title)
    out.append("  ".join(f"{n:>{w}}" for n, w in cols))
    for r in rows:
        vals = [r.name[:14]] + [_metric_cell(r, k, d) for k, _, _, d in METRICS]
        vals += [_fmt(r.metrics.get("samples_per_s"), 1)]
        vals += [_gap_cell(r, k) if r.kind == "distilled" else "" for k in GAP_METRICS]
        out.append("  ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))
    if several:
        n = max(r.num_seeds for r in rows)
        out.append(f"({n} seeds) " + NOISE_LEGEND)
        gains = [f"{r.name} ({', '.join(k for k in GAP_METRICS if r.gap_stats.get(k) and r.gap_stats[k].beyond_noise)})"
                 for r in rows if r.kind == "distilled" and any(st.beyond_noise for st in r.gap_stats.values())]
        out.append("beyond noise: " + ("; ".join(gains) if gains else "none"))
    elif any(r.kind == "distilled" for r in rows):
        out.append(SINGLE_SEED_NOTE)
    if has_no_gap(rows):
        out.append(NO_GAP_NOTE)
    return "\n".join(out)


def write_csv(rows: list[Row], path: str | Path, config: str = "") -> None:
    """One row per run: metric means (and sd over seeds), gap closed mean, its standard error,
    the number of seeds it rests on and the verdict (``gain`` / ``noise`` / ``worse``)."""
    fields = ["configuration", "run", "kind", "model", "strategy", "seeds"]
    fields += [f for k, *_ in METRICS for f in (k, f"{k}_sd")] + ["samples_per_s"]
    fields += [f for k in GAP_METRICS for f in (f"gap_closed_{k}", f"gap_closed_{k}_se", f"gap_closed_{k}_verdict")]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            rec = {"configuration": config, "run": r.name, "kind": r.kind, "model": r.model, "strategy": r.strategy,
                   "seeds": " ".join(str(s) for s in r.seeds) if r.seeds else ""}
            for k, *_ in METRICS:
                rec[k] = r.metrics.get(k)
                st = r.metric_stats.get(k)
                rec[f"{k}_sd"] = st.sd if st is not None and st.n > 1 else ""
            rec["samples_per_s"] = r.metrics.get("samples_per_s")
            for k in GAP_METRICS:
                st = r.gap_stats.get(k)
                distilled = r.kind == "distilled"
                rec[f"gap_closed_{k}"] = r.gap.get(k) if distilled else ""
                rec[f"gap_closed_{k}_se"] = st.se if distilled and st is not None and st.n > 1 else ""
                rec[f"gap_closed_{k}_verdict"] = st.verdict if distilled and st is not None else ""
            w.writerow(rec)


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_markdown(rows: list[Row], path: str | Path, title: str, intro: str = "", plots: dict | None = None,
                   extra: str = "") -> None:
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    parts += [
        "Metrics on the test split (`kdcache eval`): energy MAE (meV), force MAE (meV/Å), force "
        "cosine, EFwT (%, |ΔE| < 0.02 eV and every free-atom force component within 0.03 eV/Å), "
        "inference throughput (samples/s). *Gap closed* = (baseline − distilled) / (baseline − "
        "teacher) per metric, as in Table 1 of Ekström Kelvinius et al. (NeurIPS 2023).",
        "",
        markdown_table(rows),
        "",
    ]
    if _several_seeds(rows):
        parts += [f"{max(r.num_seeds for r in rows)} seeds per run. " + NOISE_LEGEND, ""]
    elif any(r.kind == "distilled" for r in rows):
        parts += [SINGLE_SEED_NOTE, ""]
    if has_no_gap(rows):
        parts += [NO_GAP_NOTE, ""]
    if extra:
        parts += [extra, ""]
    for caption, file in (plots or {}).items():
        parts += [f"## {caption}", "", f"![{caption}]({file})", ""]
    Path(path).write_text("\n".join(parts))
