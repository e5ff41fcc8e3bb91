"""Layers shared by the STViT model families."""

from .local import *  # noqa: F401,F403
from .local import __all__ as _local_all
from .patch import *  # noqa: F401,F403
from .patch import __all__ as _patch_all
from .semantic import *  # noqa: F401,F403
from .semantic import __all__ as _semantic_all

__all__ = list(_semantic_all) + list(_local_all) + list(_patch_all)
