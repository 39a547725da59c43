"""Shared fixtures of the stage-two tests: tiny demo data and a complete feature store."""

from __future__ import annotations

import pytest

from . import kd_helpers as H


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Paths of tiny demo splits (8 train, 4 val structures)."""
    return H.make_demo(tmp_path_factory.mktemp("demo"), num_train=8, num_val=4)


@pytest.fixture(scope="session")
def train_set(demo):
    return H.open_ds(demo["train"])


@pytest.fixture(scope="session")
def val_set(demo):
    return H.open_ds(demo["val"])


@pytest.fixture(scope="session")
def targets(train_set):
    return H.teacher_targets(train_set)


@pytest.fixture(scope="session")
def store_path(tmp_path_factory, train_set, targets):
    """A complete store with every target kind, 'made by' a PaiNN teacher."""
    return H.write_store(tmp_path_factory.mktemp("store") / "teacher.zarr", train_set, targets=targets)


@pytest.fixture(scope="session")
def store(store_path, train_set):
    from kdcache.store import FeatureStore

    return FeatureStore.open(store_path, dataset=train_set)
