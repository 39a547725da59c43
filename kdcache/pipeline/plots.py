"""Report figures (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

_STEP_COLUMNS = ("step", "global_step", "steps", "iteration")
_ENERGY_COLUMNS = ("val_energy_mae", "val/energy_mae", "val.energy_mae", "val_energy_mae_mev", "energy_mae")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_curve(metrics_csv: str | Path, metric: str = "energy_mae") -> tuple[np.ndarray, np.ndarray]:
    """Validation curve from a training run's ``metrics.csv``.

    Looks for a step column (``step``) and the validation column of ``metric`` (``val_<metric>``,
    ``val/<metric>``, or ``<metric>`` in rows whose ``split`` is ``val``). Rows without a value
    (e.g. training-loss rows) are dropped.
    """
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return np.zeros(0), np.zeros(0)
    cols = list(rows[0].keys())
    step_col = next((c for c in _STEP_COLUMNS if c in cols), None)
    candidates = (f"val_{metric}", f"val/{metric}", f"val.{metric}", f"val_{metric}_mev", metric)
    val_col = next((c for c in candidates if c in cols), None)
    if val_col is None:
        val_col = next((c for c in cols if "val" in c and metric in c), None)
    if step_col is None or val_col is None:
        raise ValueError(f"{metrics_csv}: no step/{metric} columns among {cols}")
    split_col = "split" if "split" in cols else None
    steps, vals = [], []
    for r in rows:
        if split_col and val_col == metric and r.get(split_col) not in ("val", "validation"):
            continue
        try:
            s, v = float(r[step_col]), float(r[val_col])
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            steps.append(s)
            vals.append(v)
    return np.asarray(steps), np.asarray(vals)


def plot_curves(curves: dict[str, tuple], path: str | Path, ylabel: str = "validation energy MAE (meV)",
                title: str = "") -> None:
    """One line per run; the baseline dashed black so distilled students stand out against it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (steps, vals) in curves.items():
        if len(steps) == 0:
            continue
        style = dict(color="black", ls="--", lw=2) if name == "baseline" else dict(lw=1.5)
        ax.plot(steps, vals, marker="o", ms=3, label=name, **style)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if all(np.all(np.asarray(v) > 0) for _, v in curves.values() if len(v)):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_parity(preds: dict[str, dict], path: str | Path, max_points: int = 20000, note: str = "") -> None:
    """Predicted against true energies (top row, eV) and force components (bottom row, eV/Å).

    Each panel's MAE is over every point given (before the scatter is thinned out).

    Args:
        preds: run name -> ``{energy_true, energy_pred [S], forces_true, forces_pred [N, 3]}``.
        note: a line under the figure, e.g. which samples the MAEs are over.
    """
    plt = _plt()
    n = max(1, len(preds))
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 0.6, 5.4), squeeze=False)
    for j, (name, p) in enumerate(preds.items()):
        for i, (key, unit) in enumerate((("energy", "eV"), ("forces", "eV/Å"))):
            ax = axes[i, j]
            t = np.asarray(p[f"{key}_true"], dtype=np.float64).ravel()
            y = np.asarray(p[f"{key}_pred"], dtype=np.float64).ravel()
            mae = float(np.mean(np.abs(t - y))) if t.size else float("nan")
            if t.size > max_points:  # keep files small; a fixed subsample is enough to see bias
                idx = np.random.default_rng(0).choice(t.size, max_points, replace=False)
                t, y = t[idx], y[idx]
            ax.scatter(t, y, s=4, alpha=0.5, lw=0)
            if t.size:
                lo, hi = float(min(t.min(), y.min())), float(max(t.max(), y.max()))
                ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
                ax.text(0.03, 0.95, f"MAE {mae * 1000:.1f} m{unit}", transform=ax.transAxes, va="top", fontsize=7)
            ax.set_title(f"{name}: {key}", fontsize=8)
            ax.set_xlabel(f"true ({unit})", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"predicted ({unit})", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    if note:
        fig.text(0.5, 0.003, note, ha="center", va="bottom", fontsize=6)
        fig.subplots_adjust(bottom=0.14)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cka(values: np.ndarray, rows: list[str], cols: list[str], path: str | Path, title: str = "") -> None:
    """Heat map of CKA values: one row per student run, one column per teacher feature."""
    plt = _plt()
    values = np.asarray(values, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2.4, 0.45 * len(rows) + 1.4))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"teacher {c}" for c in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r} node" for r in rows], fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                    color="white" if (np.isfinite(v) and v < 0.6) else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_title(title or "CKA similarity, student vs teacher features (test atoms)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
