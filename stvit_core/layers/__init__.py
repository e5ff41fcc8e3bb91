"""Layers shared by the STViT model families."""

from .semantic import (
    CrossAttention,
    CrossAttentionBlock,
    RecoveryBlock,
    SemanticTokenGenerator,
    pool_image_tokens,
    semantic_grid_size,
)

__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "RecoveryBlock",
    "SemanticTokenGenerator",
    "pool_image_tokens",
    "semantic_grid_size",
]
