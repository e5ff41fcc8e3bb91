"""Layers shared by the STViT model families."""

from .semantic import *  # noqa: F401,F403
from .semantic import __all__  # noqa: F401
