"""STViT model families. Importing this package registers every model with timm."""

from . import (
    deit,  # noqa: F401
    swin,  # noqa: F401
)
from .deit import RecoveryVisionTransformer, SemanticVisionTransformer
from .swin import RecoverySwinTransformer

__all__ = [
    "RecoverySwinTransformer",
    "RecoveryVisionTransformer",
    "SemanticVisionTransformer",
]
