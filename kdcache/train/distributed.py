"""Kept so that ``from kdcache.train import distributed`` goes on working: the helpers live in
:mod:`kdcache.distributed`, shared by extraction and training."""

from kdcache.distributed import (  # noqa: F401
    barrier,
    broadcast_object,
    cleanup,
    env_world,
    is_distributed,
    pick_device,
    setup,
)
