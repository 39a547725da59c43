"""`kdcache eval` metrics: hand-checked values, and an Open Catalyst checkpoint on demo data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcache import keys as K
from kdcache.evaluate import MetricSums, evaluate_checkpoint, format_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "reference"


def test_metrics_by_hand():
    m = MetricSums()
    # two structures: atoms 0-1 in the first, 2-3 in the second; atom 1 fixed
    pred_e, true_e = torch.tensor([1.01, 2.5]), torch.tensor([1.0, 2.0])
    true_f = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    pred_f = true_f.clone()
    pred_f[0, 0] += 0.02  # free atom, within 0.03
    pred_f[1] = torch.tensor([5.0, 5.0, 5.0])  # fixed atom: ignored everywhere
    pred_f[3] = torch.tensor([-1.0, -1.0, 0.0])  # opposite direction
    batch = torch.tensor([0, 0, 1, 1])
    fixed = torch.tensor([False, True, False, False])
    m.add(pred_e, pred_f, true_e, true_f, batch, torch.tensor([2, 2]), fixed)
    r = m.result()
    assert r["energy_mae"] == pytest.approx(1000 * (0.01 + 0.5) / 2)
    # free atoms 0, 2, 3: component errors 0.02 + 0 + (2 + 2) over 9 components
    assert r["force_mae"] == pytest.approx(1000 * 4.02 / 9)
    assert r["force_cos"] == pytest.approx((1.0 + 1.0 - 1.0) / 3, abs=1e-4)
    # structure 0: |dE| = 0.01 and worst free component 0.02 -> within; structure 1: no
    assert r["efwt"] == pytest.approx(0.5)
    assert r["num_samples"] == 2


def test_eval_of_an_open_catalyst_checkpoint_matches_a_direct_computation(demo, val_set):
    from kdcache.models.checkpoint import load_checkpoint
    from torch_geometric.data import Batch

    ckpt = FIXTURES / "painn" / "checkpoint.pt"
    metrics = evaluate_checkpoint(ckpt, demo["val"], batch_size=3, device="cpu")
    model = load_checkpoint(ckpt).model  # float64, like the reference
    de, df = [], []
    for i in range(len(val_set)):
        b = Batch.from_data_list([val_set[i]])
        b[K.POSITIONS], b[K.CELL] = b[K.POSITIONS].double(), b[K.CELL].double()
        with torch.no_grad():
            out = model.predict(b)
        de.append((out[K.ENERGY] - b[K.ENERGY]).abs())
        df.append((out[K.FORCES] - b[K.FORCES])[~b[K.FIXED]].abs().reshape(-1))
    assert metrics["energy_mae"] == pytest.approx(1000 * torch.cat(de).mean().item(), rel=1e-4)
    assert metrics["force_mae"] == pytest.approx(1000 * torch.cat(df).mean().item(), rel=1e-4)
    assert metrics["num_samples"] == len(val_set) and metrics["samples_per_s"] > 0
    assert "EFwT" in format_table(metrics)
