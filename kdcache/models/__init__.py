"""The models behind one contract (:mod:`kdcache.models.base`), and their registry.

The registry lives in :mod:`kdcache.models.registry`; it is re-exported here so that
``from kdcache.models import build_model`` keeps working.
"""

from __future__ import annotations

from kdcache.models.base import Normalizer, PotentialModel
from kdcache.models.registry import MODEL_CLASSES, build_model, is_model_name, model_class, registry_key

__all__ = ["MODEL_CLASSES", "Normalizer", "PotentialModel", "build_model", "is_model_name", "model_class",
           "registry_key"]
