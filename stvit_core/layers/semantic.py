"""The paper's building blocks, shared by every model family (DeiT, Swin).

Vocabulary (STViT, Chang et al., CVPR 2023):

* *image tokens* ``X``: the patch tokens of the backbone.
* *semantic tokens* ``S``: a handful of cluster centres that replace the image tokens in later layers.
* :class:`SemanticTokenGenerator` (the paper's STGM): initial semantic tokens are image tokens pooled to an
  ``s x s`` grid; cross-attention layers (queries: semantic tokens, keys/values: image tokens) refine them.
  Layer 1 attends to ``X``; later layers attend to ``concat(S, X)`` and may add learned *global semantic
  tokens* ``G`` to their queries. The image tokens themselves are not updated.
* :class:`RecoveryBlock` (STViT-R): queries are the image tokens saved before the generator, keys/values the
  semantic tokens; it rebuilds a full-resolution token map for dense tasks.

Every attention here calls :func:`torch.nn.functional.scaled_dot_product_attention` without masks, so fused
(flash / memory-efficient) kernels run, and keys and values come from one fused ``kv`` projection.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_

__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "RecoveryBlock",
    "SemanticTokenGenerator",
    "pool_image_tokens",
    "semantic_grid_size",
]


def semantic_grid_size(num_semantic_tokens: int) -> int:
    """Side of the square pooling grid for ``num_semantic_tokens`` (16 -> 4, 36 -> 6, ...)."""
    side = math.isqrt(num_semantic_tokens)
    if num_semantic_tokens < 1 or side * side != num_semantic_tokens:
        raise ValueError(f"num_semantic_tokens must be a perfect square (4, 9, 16, 36, ...), got {num_semantic_tokens}")
    return side


def pool_image_tokens(
    x: torch.Tensor,
    grid_size: Tuple[int, int],
    output_size: Union[int, Tuple[int, int]],
    mode: str = "max",
) -> torch.Tensor:
    """Pool image tokens ``(B, H*W, C)`` laid out on ``grid_size`` to ``(B, h*w, C)`` initial semantic tokens.

    Adaptive pooling, so any grid pools to any smaller one (14x14 -> 4x4 uses overlapping windows).
    ``mode`` is ``'max'`` (as in the released code) or ``'avg'``.
    """
    B, N, C = x.shape
    H, W = grid_size
    x = x.transpose(1, 2).reshape(B, C, H, W)
    if mode == "max":
        x = F.adaptive_max_pool2d(x, output_size)
    elif mode == "avg":
        x = F.adaptive_avg_pool2d(x, output_size)
    else:
        raise ValueError("unknown semantic token pooling (expected 'max' or 'avg'): " + mode)
    return x.flatten(2).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention whose queries come from one token set and keys/values from another.

    ``q`` and ``kv`` are separate projections (the query set differs from the key set); keys and values share
    one matmul. Converting a self-attention layer splits its ``qkv`` weight into these two.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, Nq, C = x.shape
        Nk = context.shape[1]
        q = self.q(x).reshape(B, Nq, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, Nk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, Nq, C)
        return self.proj_drop(self.proj(x))


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x = x + attn(norm(x), norm(context))``, then ``x = x + mlp(norm(x))``.

    One ``norm1`` normalises queries and keys alike, as the self-attention block it is converted from did.
    ``attn_residual=False`` drops the attention shortcut (the released local generator layer, whose queries
    are pooled tokens that the attention output replaces). ``init_values`` enables LayerScale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: Optional[float] = None,
        attn_residual: bool = True,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        mlp_layer: Type[nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.attn_residual = attn_residual
        self.norm1 = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attn = self.drop_path1(self.ls1(self.attn(self.norm1(x), self.norm1(context))))
        x = x + attn if self.attn_residual else attn
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class RecoveryBlock(CrossAttentionBlock):
    """STViT-R recovery layer: image tokens (queries) read back from the semantic tokens (keys/values).

    ``forward(image_tokens, semantic_tokens)`` returns a full-resolution token map of the image tokens' shape.
    """


class SemanticTokenGenerator(nn.Module):
    """The semantic token generation module (STGM): image tokens in, a few semantic tokens out.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias, init_values, norm_layer, act_layer: as for a transformer block.
        num_semantic_tokens: a perfect square; initial tokens are the image tokens pooled to that grid.
        depth: number of cross-attention layers (the paper uses 2).
        pool: ``'max'`` (released code) or ``'avg'`` pooling for the initial semantic tokens.
        global_tokens: learn one global semantic token per semantic token, added to the queries of layers
            2.. (the paper's "global initialisation"; truncated normal, std 0.02).
        drop_path: one rate per layer, or a single rate.
        num_prefix_tokens: class/register tokens passed as ``prefix_tokens`` (static, so tracing and
            ``torch.compile`` see no data-dependent branch).

    ``forward(image_tokens, grid_size, prefix_tokens=None)`` returns ``concat(prefix, semantic tokens)``.
    Prefix tokens (a class token) travel with the semantic tokens: in layer 1 they attend to
    ``concat(prefix, image tokens)`` exactly as in the self-attention block the layer is converted from.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_semantic_tokens: int = 16,
        depth: int = 2,
        pool: str = "max",
        global_tokens: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[float, Sequence[float]] = 0.0,
        init_values: Optional[float] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        mlp_layer: Type[nn.Module] = Mlp,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"generator depth must be at least 1, got {depth}")
        if pool not in ("max", "avg"):
            raise ValueError(f"unknown semantic token pooling {pool!r} (expected 'max' or 'avg')")
        self.num_semantic_tokens = num_semantic_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = semantic_grid_size(num_semantic_tokens)
        self.pool = pool
        rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=rates[i],
                init_values=init_values,
                act_layer=act_layer,
                norm_layer=norm_layer,
                mlp_layer=mlp_layer,
            )
            for i in range(depth)
        )
        if global_tokens and depth > 1:
            self.global_tokens = nn.Parameter(torch.zeros(1, num_semantic_tokens, dim))
            trunc_normal_(self.global_tokens, std=0.02)
        else:
            self.register_parameter("global_tokens", None)

    def forward(
        self,
        image_tokens: torch.Tensor,
        grid_size: Tuple[int, int],
        prefix_tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        semantic = pool_image_tokens(image_tokens, grid_size, self.grid, self.pool)
        num_prefix = self.num_prefix_tokens
        if prefix_tokens is not None:
            semantic = torch.cat([prefix_tokens, semantic], dim=1)
            context = torch.cat([prefix_tokens, image_tokens], dim=1)
        else:
            context = image_tokens
        semantic = self.layers[0](semantic, context)
        for layer in self.layers[1:]:
            queries = semantic
            if self.global_tokens is not None:
                if num_prefix:
                    queries = torch.cat([semantic[:, :num_prefix], semantic[:, num_prefix:] + self.global_tokens], 1)
                else:
                    queries = semantic + self.global_tokens
            semantic = layer(queries, torch.cat([semantic, image_tokens], dim=1))
        return semantic
