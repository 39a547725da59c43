"""GemNet-OC: the teacher model (see :mod:`kdcache.models.gemnet_oc.model`)."""

from kdcache.models.gemnet_oc.model import GemNetOC

__all__ = ["GemNetOC"]
