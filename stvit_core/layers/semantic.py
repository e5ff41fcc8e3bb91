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
from typing import Callable, Dict, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_

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
    "semantic_grid_size",
    "self_to_cross_attention_keys",
    "window_grid",
    "window_neighbourhood_index",
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

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from ``x`` ``(B, Nq, C)`` to ``context`` ``(B, Nk, C)``.

        ``context_index`` ``(G, K)`` splits the queries into ``G`` equal consecutive groups; group ``g`` attends
        only to the context tokens ``context_index[g]`` (local attention over overlapping neighbourhoods). Keys
        and values are projected once per context token and then gathered, never per group.
        """
        B, Nq, C = x.shape
        q = self.q(x)
        kv = self.kv(context)
        groups, k_len = (1, context.shape[1]) if context_index is None else context_index.shape
        if context_index is not None:
            kv = kv.index_select(1, context_index.reshape(-1))
        q = q.reshape(B * groups, Nq // groups, self.num_heads, self.head_dim).transpose(1, 2)
        kv = kv.reshape(B * groups, k_len, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, Nq, C)
        return self.proj_drop(self.proj(x))


def self_to_cross_attention_keys(prefix: str, name: str, value: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Where a self-attention block's parameter ``name`` goes in the cross-attention block at ``prefix``.

    ``attn.qkv.weight`` / ``attn.qkv.bias`` split row-wise (bit for bit) into ``attn.q`` and the fused
    ``attn.kv`` of :class:`CrossAttention`; every other parameter keeps its name. Used by every family's
    checkpoint filter when a pretrained block becomes a generator, semantic or recovery layer.
    """
    if name.startswith("attn.qkv."):
        kind = name[len("attn.qkv."):]
        dim = value.shape[0] // 3
        return {f"{prefix}attn.q.{kind}": value[:dim], f"{prefix}attn.kv.{kind}": value[dim:]}
    return {prefix + name: value}


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

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        context_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``context=None`` is self-attention (``x`` normalised once); ``context_index``: see CrossAttention."""
        q = self.norm1(x)
        kv = q if context is None else self.norm1(context)
        attn = self.ls1(self.attn(q, kv, context_index))
        # without the shortcut the attention output *is* the token: dropping it per sample would zero it
        x = x + self.drop_path1(attn) if self.attn_residual else attn
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class RecoveryBlock(CrossAttentionBlock):
    """STViT-R recovery layer: image tokens (queries) read back from the semantic tokens (keys/values).

    ``forward(image_tokens, semantic_tokens)`` returns a full-resolution token map of the image tokens' shape;
    image tokens may be a sequence ``(B, N, C)`` or an NHWC map ``(B, H, W, C)``.
    """

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_index=None) -> torch.Tensor:
        if x.ndim == 4:
            B, H, W, C = x.shape
            return super().forward(x.reshape(B, H * W, C), context, context_index).reshape(B, H, W, C)
        return super().forward(x, context, context_index)


def _check_generator_args(depth: int, pool: str) -> None:
    if depth < 1:
        raise ValueError(f"generator depth must be at least 1, got {depth}")
    if pool not in ("max", "avg"):
        raise ValueError(f"unknown semantic token pooling {pool!r} (expected 'max' or 'avg')")


def _per_layer(rate: Union[float, Sequence[float]], depth: int) -> list:
    return [rate] * depth if isinstance(rate, (int, float)) else list(rate)


def _refine_globally(
    layers: Sequence[nn.Module],
    semantic: torch.Tensor,
    image_tokens: torch.Tensor,
    global_tokens: Optional[torch.Tensor],
    num_prefix: int = 0,
) -> torch.Tensor:
    """The generator's global layers: queries ``S (+ G)``, keys/values ``concat(S, X)``.

    Global tokens are added to the semantic tokens only, never to the ``num_prefix`` prefix tokens before them.
    """
    for layer in layers:
        queries = semantic
        if global_tokens is not None:
            if num_prefix:
                queries = torch.cat([semantic[:, :num_prefix], semantic[:, num_prefix:] + global_tokens], 1)
            else:
                queries = semantic + global_tokens
        semantic = layer(queries, torch.cat([semantic, image_tokens], dim=1))
    return semantic


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
        _check_generator_args(depth, pool)
        self.num_semantic_tokens = num_semantic_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = semantic_grid_size(num_semantic_tokens)
        self.pool = pool
        rates = _per_layer(drop_path, depth)
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
        return _refine_globally(self.layers[1:], semantic, image_tokens, self.global_tokens, num_prefix)


class GroupedSelfAttentionBlock(CrossAttentionBlock):
    """Self-attention inside consecutive groups of ``group_size`` tokens (a window's semantic tokens).

    Only the attention is grouped; the shortcut, stochastic depth and MLP see ``(B, N, C)`` as usual.
    """

    def __init__(self, dim: int, num_heads: int, group_size: int, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.group_size = group_size

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_index=None) -> torch.Tensor:
        if context is not None or context_index is not None:
            raise ValueError("GroupedSelfAttentionBlock attends within its own token groups only")
        B, N, C = x.shape
        q = self.norm1(x).reshape(B * N // self.group_size, self.group_size, C)
        attn = self.ls1(self.attn(q, q)).reshape(B, N, C)
        x = x + self.drop_path1(attn) if self.attn_residual else attn
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def window_grid(grid_size: Tuple[int, int], window_size: int) -> Tuple[int, int]:
    """Windows per column and row when ``grid_size`` is padded up to multiples of ``window_size``."""
    return -(-grid_size[0] // window_size), -(-grid_size[1] // window_size)


def pool_windows(x: torch.Tensor, window_size: int, output_size: int, mode: str = "max") -> torch.Tensor:
    """Pool every ``window_size`` window of an NHWC map to ``output_size**2`` tokens, window-major.

    The map is zero-padded to whole windows. One adaptive pooling over the padded map equals pooling each
    window on its own (adaptive bins of ``nW * window`` -> ``nW * out`` never straddle windows). Returns
    ``(B, num_windows * output_size**2, C)`` ordered (window row, window col, token row, token col).
    """
    B, H, W, C = x.shape
    nh, nw = window_grid((H, W), window_size)
    pad_h, pad_w = nh * window_size - H, nw * window_size - W
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    x = x.permute(0, 3, 1, 2)
    size = (nh * output_size, nw * output_size)
    if mode == "max":
        x = F.adaptive_max_pool2d(x, size)
    elif mode == "avg":
        x = F.adaptive_avg_pool2d(x, size)
    else:
        raise ValueError(f"unknown semantic token pooling {mode!r} (expected 'max' or 'avg')")
    x = x.reshape(B, C, nh, output_size, nw, output_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, nh * nw * output_size * output_size, C)


def window_neighbourhood_index(
    grid_size: Tuple[int, int],
    window_size: int,
    neighbourhood_size: int,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Flat indices ``(num_windows, n_h * n_w)`` of the image tokens around every window.

    Each window's neighbourhood is ``neighbourhood_size`` tokens a side (at most the map), centred on the
    window and shifted to lie inside the real (unpadded) map, so it never holds padding. On the 14x14 map of
    a 224 px Swin with 7x7 windows and size 10 this is exactly the released ``F.unfold(kernel 10, stride 4)``.
    """
    H, W = grid_size
    nh, nw = window_grid(grid_size, window_size)

    def starts(n_windows: int, length: int, size: int) -> torch.Tensor:
        s = torch.arange(n_windows, device=device) * window_size - (size - window_size) // 2
        return s.clamp(0, length - size)

    size_h, size_w = min(neighbourhood_size, H), min(neighbourhood_size, W)
    rows = starts(nh, H, size_h)[:, None] + torch.arange(size_h, device=device)  # (nh, size_h)
    cols = starts(nw, W, size_w)[:, None] + torch.arange(size_w, device=device)  # (nw, size_w)
    index = rows[:, None, :, None] * W + cols[None, :, None, :]  # (nh, nw, size_h, size_w)
    return index.reshape(nh * nw, size_h * size_w)


class WindowSemanticTokenGenerator(nn.Module):
    """Local STGM (STViT-R on Swin): semantic tokens per window, then refined globally.

    Layer 1 (local): every ``window_size`` window is pooled to ``tokens_per_window`` tokens; these attend to
    themselves plus the image tokens of a ``neighbourhood_size`` neighbourhood around the window, and the
    attention output *replaces* them (no attention shortcut, as released). Layers 2.. (global): queries are
    the semantic tokens (plus learned global tokens if enabled), keys ``concat(S, X)`` over the whole map.

    ``forward(x)`` takes an NHWC map of any size (windows cover it padded to whole windows; keys never include
    padding, so no mask is needed) and returns ``(B, num_windows * tokens_per_window, C)``, window-major.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        tokens_per_window: int = 9,
        neighbourhood_size: Optional[int] = None,
        depth: int = 2,
        pool: str = "max",
        global_tokens: bool = False,
        num_windows: Optional[int] = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[float, Sequence[float]] = 0.0,
        init_values: Optional[float] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        mlp_layer: Type[nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        side = semantic_grid_size(tokens_per_window)
        if side > window_size:
            raise ValueError(
                f"{tokens_per_window} semantic tokens per window need windows of at least {side}x{side}, "
                f"got window size {window_size}"
            )
        _check_generator_args(depth, pool)
        self.window_size = window_size
        self.tokens_per_window = tokens_per_window
        self.side = side
        self.neighbourhood_size = neighbourhood_size or window_size + 3
        self.pool = pool
        rates = _per_layer(drop_path, depth)
        common = dict(
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
            init_values=init_values, act_layer=act_layer, norm_layer=norm_layer, mlp_layer=mlp_layer,
        )
        self.layers = nn.ModuleList(
            CrossAttentionBlock(dim, num_heads, drop_path=rates[i], attn_residual=i > 0, **common) for i in range(depth)
        )
        if global_tokens and depth > 1:
            if not num_windows:
                raise ValueError("global semantic tokens need num_windows (they are tied to one image size)")
            self.global_tokens = nn.Parameter(torch.zeros(1, num_windows * tokens_per_window, dim))
            trunc_normal_(self.global_tokens, std=0.02)
        else:
            self.register_parameter("global_tokens", None)
        self._index_cache: dict = {}

    def context_index(self, grid_size: Tuple[int, int], device: torch.device) -> torch.Tensor:
        """Indices into ``concat(pooled tokens, image tokens)`` of each window's keys (cached per size)."""
        key = (grid_size, str(device))
        index = self._index_cache.get(key)
        if index is None:
            nh, nw = window_grid(grid_size, self.window_size)
            num_windows = nh * nw
            pooled = torch.arange(num_windows * self.tokens_per_window, device=device)
            pooled = pooled.reshape(num_windows, self.tokens_per_window)
            neighbours = window_neighbourhood_index(grid_size, self.window_size, self.neighbourhood_size, device)
            index = torch.cat([pooled, neighbours + num_windows * self.tokens_per_window], dim=1)
            self._index_cache[key] = index
        return index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pooled = pool_windows(x, self.window_size, self.side, self.pool)
        image_tokens = x.reshape(B, H * W, C)
        index = self.context_index((H, W), x.device)
        semantic = self.layers[0](pooled, torch.cat([pooled, image_tokens], dim=1), index)
        if self.global_tokens is not None and self.global_tokens.shape[1] != semantic.shape[1]:
            raise ValueError(
                f"global semantic tokens were built for {self.global_tokens.shape[1]} semantic tokens, "
                f"this {H}x{W} map gives {semantic.shape[1]}; build the model for this image size"
            )
        return _refine_globally(self.layers[1:], semantic, image_tokens, self.global_tokens)


class DumbbellUnit(nn.Module):
    """STViT-R's dumbbell unit: image-token block(s), STGM, semantic blocks, recovery.

    ``x = image_blocks(x)``; ``s = generator(x)``; ``s = semantic_blocks(s)``; ``x = recovery(x, s)``. The
    parts decide the token layout (NHWC maps for Swin, token sequences for ViT); the unit only wires them, so
    its output has the shape of its input and units stack like ordinary blocks.
    """

    def __init__(self, image_blocks: nn.Module, generator: nn.Module, semantic_blocks: nn.Module, recovery: nn.Module):
        super().__init__()
        self.image_blocks = image_blocks
        self.generator = generator
        self.semantic_blocks = semantic_blocks
        self.recovery = recovery

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.image_blocks(x)
        semantic = self.semantic_blocks(self.generator(x))
        return self.recovery(x, semantic)
