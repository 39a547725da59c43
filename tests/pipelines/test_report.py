"""Report numbers (gap closed as in the paper's Table 1), its files and plots, on synthetic runs."""

import math

import numpy as np
import pytest

from kdcache.pipeline import plots as P
from kdcache.pipeline import report as R


def _rows():
    teacher = R.Row("teacher", "teacher", {"energy_mae": 100.0, "force_mae": 20.0, "force_cos": 0.8, "efwt": 0.10,
                                           "samples_per_s": 50.0})
    base = R.Row("baseline", "baseline", {"energy_mae": 200.0, "force_mae": 30.0, "force_cos": 0.6, "efwt": 0.02,
                                          "samples_per_s": 400.0})
    good = R.Row("v2v", "distilled", {"energy_mae": 150.0, "force_mae": 27.5, "force_cos": 0.7, "efwt": 0.04,
                                      "samples_per_s": 390.0}, strategy="v2v (λ=1)")
    bad = R.Row("e2n", "distilled", {"energy_mae": 220.0, "force_mae": 30.0, "force_cos": 0.5, "efwt": 0.02,
                                     "samples_per_s": 395.0}, strategy="e2n (λ=0.1)")
    return R.add_gaps([teacher, base, good, bad])


def test_gap_closed_values():
    rows = _rows()
    v2v, e2n = rows[2], rows[3]
    assert v2v.gap["energy_mae"] == pytest.approx(0.5)       # (200-150)/(200-100)
    assert v2v.gap["force_mae"] == pytest.approx(0.25)       # (30-27.5)/(30-20)
    assert v2v.gap["force_cos"] == pytest.approx(0.5)        # higher is better: same formula
    assert v2v.gap["efwt"] == pytest.approx(0.25)            # (0.04-0.02)/(0.10-0.02)
    assert e2n.gap["energy_mae"] == pytest.approx(-0.2)      # worse than the baseline: negative
    assert e2n.gap["force_mae"] == pytest.approx(0.0)
    assert math.isnan(R.gap_closed(1.0, 0.5, 1.0))          # teacher == baseline: undefined
    # a teacher worse than the baseline leaves no gap to close (not a misleading ratio)
    assert math.isnan(R.gap_closed(100.0, 150.0, 120.0))
    assert math.isnan(R.gap_closed(0.6, 0.7, 0.5, higher_is_better=True))
    assert R.gap_closed(0.6, 0.7, 0.8, higher_is_better=True) == pytest.approx(0.5)


def test_markdown_csv_and_terminal_table(tmp_path):
    rows = _rows()
    R.write_csv(rows, tmp_path / "r.csv", config="demo")
    back = R.read_csv(tmp_path / "r.csv")
    assert [b["run"] for b in back] == ["teacher", "baseline", "v2v", "e2n"]
    assert float(back[2]["gap_closed_energy_mae"]) == pytest.approx(0.5)
    assert float(back[2]["efwt"]) == pytest.approx(0.04)  # CSV keeps eval's fraction
    assert back[0]["gap_closed_energy_mae"] == ""
    R.write_markdown(rows, tmp_path / "r.md", "Report", plots={"Parity": "parity.png"})
    md = (tmp_path / "r.md").read_text()
    assert "| v2v | v2v (λ=1) | 150.0 | 27.50 | 0.7000 | 4.00 | 390.0 | +50.0% | +25.0% | +50.0% | +25.0% |" in md
    assert "![Parity](parity.png)" in md
    text = R.gap_table_text(rows)
    line = next(l for l in text.splitlines() if l.strip().startswith("e2n"))
    assert "-20.0%" in line and "+0.0%" in line


def test_read_curve_and_plots(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,epoch,lr,train_loss,val_loss,val_energy_mae,val_force_mae\n"
                   "10,0,0.001,1.0,,,\n20,0,0.001,0.9,0.5,300.5,40\n40,1,0.001,0.8,0.4,250.25,35\n")
    steps, vals = P.read_curve(csv)
    assert steps.tolist() == [20.0, 40.0] and vals.tolist() == [300.5, 250.25]
    P.plot_curves({"baseline": (steps, vals), "v2v": (steps, vals * 0.9)}, tmp_path / "c.png")
    rng = np.random.default_rng(0)
    preds = {n: {"energy_true": rng.normal(size=8), "energy_pred": rng.normal(size=8),
                 "forces_true": rng.normal(size=(30, 3)), "forces_pred": rng.normal(size=(30, 3))}
             for n in ("teacher", "baseline")}
    P.plot_parity(preds, tmp_path / "p.png")
    P.plot_cka(np.array([[0.9, 0.5], [np.nan, 0.2]]), ["baseline", "v2v"], ["node", "e2n"], tmp_path / "k.png")
    for f in ("c.png", "p.png", "k.png"):
        data = (tmp_path / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_teacher_worse_than_baseline_is_flagged(tmp_path):
    rows = _rows()
    rows[0].metrics["energy_mae"] = 250.0  # the teacher loses to the baseline on energies
    R.add_gaps(rows)
    assert math.isnan(rows[2].gap["energy_mae"]) and rows[2].gap["force_mae"] == pytest.approx(0.25)
    text = R.gap_table_text(rows)
    assert "n/a" in text and R.NO_GAP_NOTE in text
    R.write_markdown(rows, tmp_path / "r.md", "Report")
    assert R.NO_GAP_NOTE in (tmp_path / "r.md").read_text()
