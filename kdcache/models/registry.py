"""The model registry: registry name -> class, and building a model by name.

Below both of its users (:mod:`kdcache.models.checkpoint` and :mod:`kdcache.models.presets`),
above nothing but :mod:`kdcache.models.base`. Imports are lazy: naming a model never imports
another model's module, so a stage-two run with a PaiNN student does not import GemNet-OC (the
teacher) at all.
"""

from __future__ import annotations

import importlib
import inspect

from kdcache.models.base import PotentialModel

#: registry name (as in Open Catalyst configs) -> "module:Class"
MODEL_CLASSES: dict[str, str] = {
    "gemnet_oc": "kdcache.models.gemnet_oc:GemNetOC",
    "painn": "kdcache.models.painn:PaiNN",
    "schnet": "kdcache.models.schnet:SchNet",
}


def registry_key(name: str) -> str:
    """The registry spelling of a model name (``GemNet-OC`` -> ``gemnet_oc``).

    Args:
        name: a model name as a user or a config spells it.
    """
    return name.lower().replace("-", "_")


def is_model_name(name) -> bool:
    """True when ``name`` (any spelling :func:`registry_key` accepts) names a registered model."""
    return isinstance(name, str) and registry_key(name) in MODEL_CLASSES


def model_class(name: str) -> type[PotentialModel]:
    """The class of a registered model.

    Args:
        name: registry name (``painn``, ``schnet``, ``gemnet_oc``; ``-`` and case are ignored).

    Raises:
        ValueError: not a registered model.
    """
    if not is_model_name(name):
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_CLASSES)}")
    module, cls = MODEL_CLASSES[registry_key(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, **config) -> PotentialModel:
    """Build a model by registry name with constructor arguments (Open Catalyst names).

    Every model refuses arguments it does not take (the same rule for all): a misspelt or
    foreign setting must not silently leave a default in place.

    Args:
        name: registry name.
        **config: constructor arguments.

    Raises:
        ValueError: unknown model.
        TypeError: an argument the model does not take (all of them named).
    """
    cls = model_class(name)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return cls(**config)  # the class takes any keyword itself (e.g. a wrapper): its own rule
    unknown = sorted(k for k in config if k not in params or k == "self")
    if unknown:
        takes = sorted(k for k in params if k != "self")
        raise TypeError(f"model {registry_key(name)!r} takes no argument(s) {unknown}; it takes {takes}")
    return cls(**config)


__all__ = ["MODEL_CLASSES", "build_model", "is_model_name", "model_class", "registry_key"]
