"""Stage one's feature store: the Zarr v3 layout, its writer, a fast reader and a local sampler.

``kdcache.store.extract`` (the teacher run) is imported on demand only: reading a store never
imports a model.
"""

from kdcache.store.format import Layout
from kdcache.store.reader import FeatureStore
from kdcache.store.sampler import LocalBatchSampler
from kdcache.store.writer import StoreWriter

__all__ = ["FeatureStore", "Layout", "LocalBatchSampler", "StoreWriter"]
