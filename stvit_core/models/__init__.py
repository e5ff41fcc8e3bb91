"""STViT model families. Importing this package registers every model with timm."""

from . import (
    deit,  # noqa: F401
    swin,  # noqa: F401
)
from .deit import SemanticVisionTransformer
from .swin import SemanticSwinTransformer

__all__ = ["SemanticSwinTransformer", "SemanticVisionTransformer"]
