"""Layers shared by the STViT model families."""

from .semantic import (
    CrossAttention,
    CrossAttentionBlock,
    DumbbellUnit,
    GroupedSelfAttentionBlock,
    RecoveryBlock,
    SemanticTokenGenerator,
    WindowSemanticTokenGenerator,
    pool_image_tokens,
    pool_windows,
    self_to_cross_attention_keys,
    semantic_grid_size,
    window_grid,
    window_neighbourhood_index,
)

__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "DumbbellUnit",
    "GroupedSelfAttentionBlock",
    "RecoveryBlock",
    "SemanticTokenGenerator",
    "WindowSemanticTokenGenerator",
    "pool_image_tokens",
    "pool_windows",
    "self_to_cross_attention_keys",
    "semantic_grid_size",
    "window_grid",
    "window_neighbourhood_index",
]
