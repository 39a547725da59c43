"""kdcache: two-stage, offline knowledge distillation for molecular GNNs.

Stage one (:mod:`kdcache.store`) runs a teacher once and writes its features into a Zarr store;
stage two (:mod:`kdcache.train`) trains students against the stored targets without the teacher.
"""

__version__ = "0.1.0"
