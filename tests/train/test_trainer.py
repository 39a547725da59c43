"""The trainer on demo data: every strategy lowers its own loss; exact resume; refusals."""

from __future__ import annotations

import csv

import pytest
import torch

from kdcache import keys as K
from kdcache.errors import ConfigError
from kdcache.train import TrainConfig, Trainer
from kdcache.train.data import collate

from . import kd_helpers as H

NUM_WORKERS = 1


def _config(tmp_path, name, **kw):
    base = dict(student=H.STUDENT, student_overrides=H.STUDENT_OVERRIDES, out=str(tmp_path / name),
                batch_size=4, progress=False, lr=5e-3, seed=0)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.mark.parametrize("strategy,feature_norm", [
    ("n2n", "standard"), ("e2n", "standard"), ("v2v", "standard"), ("vanilla1", "standard"), ("vanilla2", "standard"),
    ("n2n", "none"), ("v2v", "none")])
def test_each_strategy_lowers_its_own_loss(tmp_path, strategy, feature_norm, train_set, store):
    # PaiNN's vector features start at zero, so a standardised v2v term (of order one) falls
    # slowly over the first steps: that case gets more of them and a looser bound
    steps, bound = (12, 0.95) if (strategy, feature_norm) == ("v2v", "standard") else (6, 0.9)
    cfg = _config(tmp_path, strategy, strategy=f"{strategy}:100", max_steps=steps, batch_size=2,
                  feature_norm=feature_norm)
    trainer = Trainer(cfg, train_dataset=train_set, store=store)
    batch = collate(trainer.train_joined.__getitems__([0, 1, 2, 3]))  # seen and unseen samples
    with torch.no_grad():
        before = trainer.objective(batch)[strategy].item()
    result = trainer.fit()
    with torch.no_grad():
        after = trainer.objective(batch)[strategy].item()
    assert result["step"] == steps
    assert after < bound * before, (strategy, before, after)
    # the run folder: resolved config, last checkpoint (kdcache format, loadable), metrics
    assert (tmp_path / strategy / "config.yaml").exists()
    assert (tmp_path / strategy / "metrics.csv").exists()
    from kdcache.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / strategy / "last.pt")
    assert loaded.name == "painn"
    assert loaded.extra["trainer_state"]["step"] == steps


def _weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["extra"]["trainer_state"]
    return ckpt["state_dict"], state["objective"], state["optimizer"]["state"], state


@pytest.mark.slow
def test_exact_resume_matches_uninterrupted_run(tmp_path, train_set, val_set, store):
    common = dict(strategy="v2v:10,vanilla2:1", max_steps=4, checkpoint_every=2, eval_every=3, augment=["rotate"],
                  scheduler="warmup_exp", warmup_steps=2, decay_steps=3, lr=2e-3)
    full = Trainer(_config(tmp_path, "full", **common), train_dataset=train_set, val_dataset=val_set, store=store)
    full.fit()

    cfg = _config(tmp_path, "resumed", **common)
    first = Trainer(cfg, train_dataset=train_set, val_dataset=val_set, store=store)
    assert first.fit(stop_after_steps=3)["stopped"]  # "killed" after step 3; last.pt is from step 2
    assert _weights(tmp_path / "resumed" / "last.pt")[3]["step"] == 2
    # the same command again, with loader workers this time (order and rotations must not change)
    cfg2 = _config(tmp_path, "resumed", **{**common, "num_workers": NUM_WORKERS})
    second = Trainer(cfg2, train_dataset=train_set, val_dataset=val_set, store=store)
    assert second.fit()["step"] == 4

    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "resumed" / "last.pt")
    assert a[3]["step"] == b[3]["step"] == 4 and a[3]["epoch"] == b[3]["epoch"] == 2  # epoch 1 finished
    for x, y in ((a[0], b[0]), (a[1], b[1])):  # EMA weights (the model) and raw weights + maps
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    for i in a[2]:  # optimiser moments
        for k, v in a[2][i].items():
            assert torch.equal(v, b[2][i][k])
    # metrics rows agree (the validation at step 3 was done once in each run)
    rows = [list(csv.DictReader(open(tmp_path / n / "metrics.csv"))) for n in ("full", "resumed")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == ["3", "4"]
    assert [r["val_energy_mae"] for r in rows[0]] == [r["val_energy_mae"] for r in rows[1]]
    assert (tmp_path / "full" / "best.pt").exists()


def test_resume_with_other_settings_is_refused(tmp_path, train_set, store):
    Trainer(_config(tmp_path, "run", strategy="n2n", max_steps=1), train_dataset=train_set, store=store).fit()
    other = Trainer(_config(tmp_path, "run", strategy="n2n", max_steps=2, lr=1e-2), train_dataset=train_set, store=store)
    with pytest.raises(ConfigError, match="lr"):
        other.fit()


def test_refusals(tmp_path, train_set, val_set, targets, store):
    from kdcache.store import FeatureStore

    # v2v needs PaiNN vector features: a SchNet student cannot serve it
    cfg = TrainConfig.from_dict(dict(student="schnet-tiny", student_overrides=H.SCHNET_OVERRIDES, strategy="v2v",
                                     out=str(tmp_path / "s"), progress=False))
    with pytest.raises(ConfigError, match="vector"):
        Trainer(cfg, train_dataset=train_set, store=store)
    # e2n from a PaiNN store (no edge features stored)
    painn_store = H.write_store(tmp_path / "painn.zarr", train_set, keys=(K.NODE, K.VECTOR, K.ATOM_ENERGY),
                                targets=targets)
    with pytest.raises(ConfigError, match="e2n"):
        Trainer(_config(tmp_path, "e", strategy="e2n"), train_dataset=train_set,
                store=FeatureStore.open(painn_store, dataset=train_set))
    # a store for another dataset (fingerprint) and an incomplete store, through the paths
    cfg = _config(tmp_path, "fp", strategy="n2n", store=str(painn_store))
    with pytest.raises(ConfigError, match="not extracted from this dataset"):
        Trainer(cfg, train_dataset=val_set)
    partial = H.write_store(tmp_path / "partial.zarr", train_set, keys=(K.NODE,), targets=targets, finish=False)
    with pytest.raises(ConfigError, match="incomplete"):
        Trainer(_config(tmp_path, "p", strategy="n2n", store=str(partial)), train_dataset=train_set)
    # a strategy without a store
    with pytest.raises(ConfigError, match="--store"):
        Trainer(_config(tmp_path, "n", strategy="n2n"), train_dataset=train_set)
