"""Model registry. Imports are lazy: naming a model never imports another model's module, so a
stage-two run with a PaiNN student does not import GemNet-OC (the teacher) at all."""

from __future__ import annotations

import importlib

from kdcache.models.base import Normalizer, PotentialModel

#: registry name (as in Open Catalyst configs) -> "module:Class"
MODEL_CLASSES: dict[str, str] = {
    "gemnet_oc": "kdcache.models.gemnet_oc:GemNetOC",
    "painn": "kdcache.models.painn:PaiNN",
    "schnet": "kdcache.models.schnet:SchNet",
}


def model_class(name: str) -> type[PotentialModel]:
    key = name.lower().replace("-", "_")
    if key not in MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_CLASSES)}")
    module, cls = MODEL_CLASSES[key].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, **config) -> PotentialModel:
    """Build a model by registry name with constructor arguments (Open Catalyst names)."""
    return model_class(name)(**config)


__all__ = ["MODEL_CLASSES", "Normalizer", "PotentialModel", "build_model", "model_class"]
