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
    """

    name: str
    kind: str
    metrics: dict
    strategy: str = ""
    model: str = ""
    gap: dict = field(default_factory=dict)


def gap_closed(baseline: float, distilled: float, teacher: float, higher_is_better: bool = False) -> float:
    """(baseline - distilled) / (baseline - teacher).

    ``nan`` when there is no gap: the teacher ties with the baseline or is worse than it (a ratio
    would then be large or negative for a student that is worse than the baseline).
    """
    den = baseline - teacher
    if not all(map(math.isfinite, (baseline, distilled, teacher))) or abs(den) < 1e-12 * max(1.0, abs(baseline)):
        return float("nan")
    teacher_better = teacher > baseline if higher_is_better else teacher < baseline
    if not teacher_better:
        return float("nan")
    return (baseline - distilled) / den


def add_gaps(rows: list[Row]) -> list[Row]:
    """Fill ``row.gap`` (fractions) of every row from the teacher and baseline rows."""
    teacher = next((r for r in rows if r.kind == "teacher"), None)
    baseline = next((r for r in rows if r.kind == "baseline"), None)
    for r in rows:
        r.gap = {}
        if teacher is None or baseline is None:
            continue
        for m in GAP_METRICS:
            if m in r.metrics and m in teacher.metrics and m in baseline.metrics:
                r.gap[m] = gap_closed(float(baseline.metrics[m]), float(r.metrics[m]), float(teacher.metrics[m]),
                                      higher_is_better=m in HIGHER_IS_BETTER)
    return rows


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
        cells += [_fmt(r.metrics.get(k), d, k) for k, _, _, d in METRICS]
        cells += [_fmt(r.metrics.get(THROUGHPUT[0]), THROUGHPUT[3])]
        cells += [_fmt_pct(r.gap.get(k)) if r.kind == "distilled" else "" for k, _, _, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table_text(rows: list[Row], title: str = "") -> str:
    """A plain-text table for the terminal: metrics and gap closed per distilled student."""
    cols = [("run", 14), ("E MAE meV", 10), ("F MAE meV/Å", 12), ("F cos", 7), ("EFwT %", 7), ("samples/s", 10),
            ("gap E", 8), ("gap F", 8), ("gap cos", 8), ("gap EFwT", 9)]
    out = []
    if title:
        out.append(title)
    out.append("  ".join(f"{n:>{w}}" for n, w in cols))
    for r in rows:
        vals = [r.name[:14]] + [_fmt(r.metrics.get(k), d, k) for k, _, _, d in METRICS]
        vals += [_fmt(r.metrics.get("samples_per_s"), 1)]
        vals += [_fmt_pct(r.gap.get(k)) if r.kind == "distilled" else "" for k in GAP_METRICS]
        out.append("  ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))
    if has_no_gap(rows):
        out.append(NO_GAP_NOTE)
    return "\n".join(out)


def write_csv(rows: list[Row], path: str | Path, config: str = "") -> None:
    fields = ["configuration", "run", "kind", "model", "strategy"]
    fields += [k for k, *_ in METRICS] + ["samples_per_s"] + [f"gap_closed_{k}" for k in GAP_METRICS]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            rec = {"configuration": config, "run": r.name, "kind": r.kind, "model": r.model, "strategy": r.strategy}
            for k, *_ in METRICS:
                rec[k] = r.metrics.get(k)
            rec["samples_per_s"] = r.metrics.get("samples_per_s")
            for k in GAP_METRICS:
                rec[f"gap_closed_{k}"] = r.gap.get(k) if r.kind == "distilled" else ""
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
    if has_no_gap(rows):
        parts += [NO_GAP_NOTE, ""]
    if extra:
        parts += [extra, ""]
    for caption, file in (plots or {}).items():
        parts += [f"## {caption}", "", f"![{caption}]({file})", ""]
    Path(path).write_text("\n".join(parts))
