"""feature_norm: standard makes the feature losses scale-free."""

from __future__ import annotations

import pytest
import torch

from kdcache import keys as K

from . import kd_helpers as H


def _scaled(targets, factor):
    hidden = (K.NODE, K.VECTOR, K.E2N, K.E2V)
    return [{k: (v * factor if k in hidden else v) for k, v in t.items()} for t in targets]


def _first_losses(store_path, train_set, tmp_path, feature_norm):
    """The feature terms of one fixed batch, for a freshly initialised (same-seed) student."""
    from kdcache.store import FeatureStore
    from kdcache.train import TrainConfig
    from kdcache.train.data import collate
    from kdcache.train.trainer import Trainer

    cfg = TrainConfig(student=H.STUDENT, student_overrides=H.STUDENT_OVERRIDES, strategy="n2n:1,v2v:1,e2n:1",
                      out=str(tmp_path / f"run-{feature_norm}"), max_steps=1, feature_norm=feature_norm,
                      progress=False, device="cpu", store=str(store_path))
    trainer = Trainer(cfg, train_dataset=train_set, store=FeatureStore.open(store_path, dataset=train_set))
    batch = collate(trainer.train_joined.__getitems__([0, 1, 2, 3]))
    with torch.no_grad():
        parts = trainer.objective(batch)
    return {k: float(parts[k]) for k in ("n2n", "v2v", "e2n")}


def test_standardised_loss_unchanged_when_targets_scaled_by_10(tmp_path, train_set, targets, store_path):
    scaled_path = H.write_store(tmp_path / "x10.zarr", train_set, targets=_scaled(targets, 10.0))
    plain = _first_losses(store_path, train_set, tmp_path / "a", "standard")
    scaled = _first_losses(scaled_path, train_set, tmp_path / "b", "standard")
    for k in plain:
        assert scaled[k] == pytest.approx(plain[k], rel=1e-5), k
        # an uninformed student (random map) sees a term of order one
        assert 0.05 < plain[k] < 20, (k, plain[k])
    # the paper's raw MSE grows with the square of the target scale
    raw = _first_losses(store_path, train_set, tmp_path / "c", "none")
    raw_scaled = _first_losses(scaled_path, train_set, tmp_path / "d", "none")
    for k in raw:
        assert raw_scaled[k] > 20 * raw[k], k


def test_store_without_statistics_is_a_named_error(tmp_path, train_set, targets, store_path):

    from kdcache.errors import StoreError
    from kdcache.store import FeatureStore

    store = FeatureStore.open(store_path, dataset=train_set)
    store.provenance = {**store.provenance, "stats": {}}
    with pytest.raises(StoreError, match="feature_norm: none"):
        store.standardizer(K.NODE)
