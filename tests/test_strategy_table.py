"""One strategy table (issue 11): what a strategy reads and what a teacher can store come from
kdcache.train.strategies.STRATEGIES and each model class's `available_features`, everywhere."""

from __future__ import annotations

import copy

import pytest

from kdcache import keys as K
from kdcache.errors import ConfigError
from kdcache.models import MODEL_CLASSES, model_class
from kdcache.pipeline.recipe import parse_recipe
from kdcache.store.format import FEATURE_CHOICES
from kdcache.train.strategies import (STRATEGIES, needed_features, parse_strategy, resolve_store_keys,
                                      store_features_help, teacher_features, teacher_kind)

RECIPE = {"data": {"demo": {"num_train": 8}}, "teacher": {"preset": "gemnet-oc-tiny", "train": {"max_steps": 1}},
          "students": {"preset": "painn-tiny"}}


def test_the_teacher_kind_is_read_once_from_any_name():
    assert [teacher_kind(n) for n in ("gemnet_oc", "GemNet-OC", "gemnet-oc-tiny", "PaiNN", "painn-big", "schnet")] \
        == ["gemnet_oc", "gemnet_oc", "gemnet_oc", "painn", "painn", "schnet"]
    assert teacher_kind("emt") is None and teacher_kind(None) is None  # a calculator, no provenance


@pytest.mark.parametrize("kind", sorted(MODEL_CLASSES))
def test_what_a_teacher_stores_is_its_model_class_features(kind):
    offered = model_class(kind).available_features
    stored = teacher_features(kind)
    assert set(stored) == ({f for f in offered if f in FEATURE_CHOICES} | {"atom_energy", "outputs"})
    for name in STRATEGIES:  # a strategy reads what the teacher stores, when it can at all
        reads = needed_features(name, kind)
        if any(k in offered or k not in K.FEATURE_KEYS for k in STRATEGIES[name].store_keys):
            assert set(reads) <= set(stored), (kind, name, reads)


def test_v2v_reads_the_target_of_the_teachers_kind():
    assert needed_features("v2v", "painn") == ("vector",) and needed_features("v2v", "gemnet_oc") == ("e2v",)
    assert needed_features("vanilla1", None) == ("outputs",)  # energy and forces are one --features name
    both = (K.NODE, K.VECTOR, K.E2V)  # a synthetic store holding both v2v targets
    model_class("painn")  # training v2v has a PaiNN student, so its module is there (never a teacher's import)
    assert resolve_store_keys(parse_strategy("v2v"), both, teacher_name="painn-tiny") == {"v2v": (K.VECTOR,)}
    assert resolve_store_keys(parse_strategy("v2v"), both, teacher_name="gemnet_oc") == {"v2v": (K.E2V,)}


def test_a_recipe_takes_exactly_the_strategies_of_the_table():
    raw = {**copy.deepcopy(RECIPE), "strategies": list(STRATEGIES)}
    # a strategy whose target has an extraction option of its own (hessian) names its value
    raw["store"] = {**raw.get("store", {}), "options": {"hessian_probes": 2}}
    assert [s.name for s in parse_recipe(raw, "r.yaml").strategies] == list(STRATEGIES)
    with pytest.raises(ConfigError, match=r"key 'strategies\[0\].name': unknown strategy 'x2y'"):
        parse_recipe({**copy.deepcopy(RECIPE), "strategies": ["x2y"]}, "r.yaml")


def test_the_features_help_names_each_storable_target_and_its_readers():
    text = store_features_help()
    assert text.split(", ")[0] == "node (n2n)" and "e2v (v2v)" in text and "vector (v2v)" in text
    assert "outputs (vanilla1)" in text and "atom_energy (vanilla2)" in text
    assert all(f in text for f in FEATURE_CHOICES)
