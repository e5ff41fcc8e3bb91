"""STViT model families. Importing this package registers every model with timm."""

from . import deit  # noqa: F401
from .deit import SemanticVisionTransformer

__all__ = ["SemanticVisionTransformer"]
