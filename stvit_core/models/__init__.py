"""STViT model families. Importing this package registers every model with timm."""

from ..layers import use_patch_gemm
from . import (
    deit,  # noqa: F401
    swin,  # noqa: F401
)
from .deit import RecoveryVisionTransformer, SemanticVisionTransformer
from .swin import DetectionSwinTransformer, RecoverySwinTransformer

__all__ = [
    "DetectionSwinTransformer",
    "RecoverySwinTransformer",
    "RecoveryVisionTransformer",
    "SemanticVisionTransformer",
    "use_patch_gemm",
]
