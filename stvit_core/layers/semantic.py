"""The paper's building blocks, shared by every model family (DeiT, Swin).

Vocabulary (STViT, Chang et al., CVPR 2023):

* *image tokens* ``X``: the patch tokens of the backbone, laid out on a ``grid_size`` ``(H, W)`` grid.
* *semantic tokens* ``S``: a handful of cluster centres that replace the image tokens in later layers. They
  start as the image tokens pooled to a ``semantic_grid x semantic_grid`` grid (per window for Swin).
* :class:`SemanticTokenGenerator` (the paper's STGM): cross-attention layers (queries: semantic tokens,
  keys/values: image tokens) refine the pooled tokens. Layer 1 attends to ``X``; later layers attend to
  ``concat(S, X)`` and may add learned *global semantic tokens* ``G`` to their queries. ``X`` is not updated.
* :class:`RecoveryBlock` (STViT-R): queries are the image tokens saved before the generator, keys/values the
  semantic tokens; it rebuilds a full-resolution token map for dense tasks.
* :class:`DumbbellUnit` (STViT-R): six source blocks, ``DUMBBELL_UNIT_PARTS``, one home for the unit's layout.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` without masks (fused kernels),
or timm's explicit-softmax path where ``fused_attn`` is off. Every shape that depends on the image size (the
pooling bins, the windows' key indices) is an index buffer computed when the grid size is set, so the graph is
static: ``torch.fx``, ``torch.compile(fullgraph=True)``, ``torch.export`` and ONNX see gathers, not
shape-dependent Python.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import register_notrace_function

__all__ = [
    "DUMBBELL_UNIT_DEPTH",
    "DUMBBELL_UNIT_PARTS",
    "CrossAttention",
    "CrossAttentionBlock",
    "DumbbellUnit",
    "GroupedSelfAttentionBlock",
    "RecoveryBlock",
    "SemanticTokenGenerator",
    "WindowSemanticTokenGenerator",
    "adaptive_pool_index",
    "dumbbell_block_index",
    "dumbbell_unit_keys",
    "gather_max",
    "pool_image_tokens",
    "pool_windows",
    "self_to_cross_attention_keys",
    "semantic_grid",
    "semantic_grid_size",
    "take_indices",
    "window_context_index",
    "window_grid",
    "window_neighbourhood_index",
]


def semantic_grid(num_semantic_tokens: int) -> int:
    """Side of the square grid of ``num_semantic_tokens`` semantic tokens (16 -> 4, 36 -> 6, ...)."""
    side = math.isqrt(num_semantic_tokens)
    if num_semantic_tokens < 1 or side * side != num_semantic_tokens:
        raise ValueError(f"num_semantic_tokens must be a perfect square (4, 9, 16, 36, ...), got {num_semantic_tokens}")
    return side


semantic_grid_size = semantic_grid  # deprecated name (0.x releases)


def take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]] = None) -> Tuple[List[int], int]:
    """timm's ``forward_intermediates`` index rule: ``None`` all, an int the last n, a sequence (negative from
    the end). Returns ``(indices, max index)``. (timm's own helper lives in a private module.)"""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        taken = list(range(num_features - indices, num_features))
    else:
        taken = []
        for i in indices:
            if not -num_features <= i < num_features:
                raise ValueError(f"feature index {i} is out of range (0 to {num_features - 1})")
            taken.append(i % num_features)
    return taken, max(taken)


# ----------------------------------------------------------------------------------------------------------
# Pooling as a static gather: the same values as adaptive pooling, and exportable (ONNX has no adaptive max)


def _adaptive_bins(length: int, out: int) -> torch.Tensor:
    """``(out, k)`` positions of torch's adaptive-pooling bins ``[floor(i*L/S), ceil((i+1)*L/S))``, each
    padded to the largest bin by repeating its last position (a repeated element leaves the max unchanged)."""
    i = torch.arange(out, device="cpu")  # on the CPU whatever the default device (meta included)
    start = torch.div(i * length, out, rounding_mode="floor")
    end = -torch.div(-(i + 1) * length, out, rounding_mode="floor")
    width = int((end - start).max())
    return torch.minimum(start[:, None] + torch.arange(width, device="cpu"), end[:, None] - 1)


def window_grid(grid_size: Tuple[int, int], window_size: int) -> Tuple[int, int]:
    """Windows per column and row when ``grid_size`` is padded up to multiples of ``window_size``."""
    return -(-grid_size[0] // window_size), -(-grid_size[1] // window_size)


def adaptive_pool_index(
    grid_size: Tuple[int, int],
    output_size: Union[int, Tuple[int, int]],
    window_size: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Flat positions ``(num_outputs, k)`` of every adaptive max-pooling bin over a ``grid_size`` token map.

    Without ``window_size``: the map pooled to ``output_size`` (``F.adaptive_max_pool2d``'s bins), row-major.
    With ``window_size``: every window of the map zero-padded to whole windows pooled to ``output_size``
    (one int), window-major (window row, window col, token row, token col); positions in the padding point
    at ``H * W``, a zero token the caller appends. ``gather_max`` of these equals the adaptive max pooling.
    """
    H, W = grid_size
    out_h, out_w = to_2tuple(output_size)
    nh, nw = (1, 1) if window_size is None else window_grid(grid_size, window_size)
    span_h, span_w = (H, W) if window_size is None else (nh * window_size, nw * window_size)
    # adaptive bins of nW * window -> nW * out never straddle windows: pooling the padded map at once is
    # pooling every window on its own
    rows, cols = _adaptive_bins(span_h, nh * out_h), _adaptive_bins(span_w, nw * out_w)
    r, c = rows[:, None, :, None], cols[None, :, None, :]
    index = (r * W + c).masked_fill((r >= H) | (c >= W), H * W)  # (rows, cols, k_h, k_w)
    k = index.shape[2] * index.shape[3]
    index = index.reshape(nh, out_h, nw, out_w, k).permute(0, 2, 1, 3, 4)
    return index.reshape(-1, k).to(device)


def gather_max(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)`` tokens -> ``(B, len(index), C)``: the max over every row of positions in ``index``."""
    return tokens.index_select(1, index.reshape(-1)).unflatten(1, index.shape).amax(2)


def pool_image_tokens(
    x: torch.Tensor,
    grid_size: Tuple[int, int],
    output_size: Union[int, Tuple[int, int]],
    mode: str = "max",
) -> torch.Tensor:
    """Pool image tokens ``(B, H*W, C)`` laid out on ``grid_size`` to ``(B, h*w, C)`` initial semantic tokens.

    Adaptive pooling, so any grid pools to any smaller one (14x14 -> 4x4 uses overlapping windows).
    ``mode`` is ``'max'`` (as in the released code; a gather + max with ``F.adaptive_max_pool2d``'s values) or
    ``'avg'`` (``F.adaptive_avg_pool2d``).
    """
    if mode == "max":
        return gather_max(x, adaptive_pool_index(grid_size, output_size, device=x.device))
    if mode != "avg":
        raise ValueError("unknown semantic token pooling (expected 'max' or 'avg'): " + mode)
    x = F.adaptive_avg_pool2d(x.transpose(1, 2).unflatten(2, tuple(grid_size)), output_size)
    return x.flatten(2).transpose(1, 2)


def pool_windows(
    x: torch.Tensor,
    window_size: int,
    output_size: int,
    mode: str = "max",
    grid_size: Optional[Tuple[int, int]] = None,
    index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pool every ``window_size`` window of an NHWC map to ``output_size**2`` tokens, window-major.

    The map is zero-padded to whole windows (padding takes part in the pooling, as in the released code).
    Returns ``(B, num_windows * output_size**2, C)`` ordered (window row, window col, token row, token col).
    ``grid_size`` (the map's ``(H, W)``) and ``index`` (``adaptive_pool_index`` for it) may be given when they
    are known ahead, so that no shape is read from ``x``.
    """
    # without a known grid_size the map may need padding: pad (a no-op copy where it does not) rather than
    # branch on the traced size
    padded = grid_size is None or grid_size[0] % window_size or grid_size[1] % window_size
    if mode == "max":
        if index is None:
            index = adaptive_pool_index(tuple(x.shape[1:3]), output_size, window_size, x.device)
        tokens = x.flatten(1, 2)
        # bins that reach into the padding point one past the image tokens, at a zero token
        return gather_max(F.pad(tokens, (0, 0, 0, 1)) if padded else tokens, index)
    if mode != "avg":
        raise ValueError(f"unknown semantic token pooling {mode!r} (expected 'max' or 'avg')")
    H, W = grid_size if grid_size is not None else x.shape[1:3]
    nh, nw = window_grid((H, W), window_size)
    if padded:
        x = F.pad(x, (0, 0, 0, nw * window_size - W, 0, nh * window_size - H))
    x = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (nh * output_size, nw * output_size))
    x = x.unflatten(2, (nh, output_size)).unflatten(4, (nw, output_size)).permute(0, 2, 4, 3, 5, 1)
    return x.flatten(1, 4)


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


def window_context_index(
    grid_size: Tuple[int, int],
    window_size: int,
    tokens_per_window: int,
    neighbourhood_size: int,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Indices into ``concat(pooled tokens, image tokens)`` of each window's keys in the local generator layer:
    the window's own pooled tokens, then its neighbourhood of image tokens."""
    nh, nw = window_grid(grid_size, window_size)
    num_pooled = nh * nw * tokens_per_window
    pooled = torch.arange(num_pooled, device=device).reshape(nh * nw, tokens_per_window)
    neighbours = window_neighbourhood_index(grid_size, window_size, neighbourhood_size, device)
    return torch.cat([pooled, neighbours + num_pooled], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Attention


class CrossAttention(nn.Module):
    """Multi-head attention whose queries come from one token set and keys/values from another.

    ``q`` and ``kv`` are separate projections (the query set differs from the key set); keys and values share
    one matmul. Converting a self-attention layer splits its ``qkv`` weight into these two. ``fused_attn``
    (timm's ``use_fused_attn()``) picks SDPA; otherwise an explicit softmax, as timm's ``Attention``.
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
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    #: Largest neighbourhood gather (bytes) that eager CPU inference does in one piece; larger ones run a piece of
    #: groups at a time, each about this size. At detection sizes one gather is hundreds of MB (215 MB per
    #: recovery layer of STViT-R-Swin-S at 800x1333): above glibc's mmap threshold (32 MB at most), so every call
    #: maps and faults in fresh pages (137 ms for that gather against 20 ms into reused memory). Pieces this size
    #: come from the heap and stay in cache for the attention that reads them. One gather elsewhere: on GPUs
    #: (the caching allocator reuses memory), when gradients flow (each piece's backward would scatter into a
    #: full-size gradient), and in traced graphs (FX, torch.compile, torch.export, ONNX), whose compilers plan
    #: memory themselves. Results are the same either way.
    gather_chunk_bytes: int = 8 * 2**20

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_index: Optional[torch.Tensor] = None,
        *,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from ``x`` ``(B, Nq, C)`` to ``context`` ``(B, Nk, C)``.

        ``context_index`` ``(G, K)`` splits the queries into ``G`` equal consecutive groups; group ``g`` attends
        only to the context tokens ``context_index[g]`` (local attention over overlapping neighbourhoods). Keys
        and values are projected once per context token and then gathered, never per group.
        ``attn_mask`` ``(G, K)`` (keyword only; boolean, True = attend) masks keys per group, the same for
        every query of the group and every sample (``(1, Nk)`` without ``context_index``).
        """
        q = self.q(x)
        kv = self.kv(context)
        if context_index is None:
            x = self._attend(q, kv, 1, attn_mask)
        else:
            groups = context_index.shape[0]
            if _tracing(kv) or kv.device.type != "cpu" or kv.requires_grad:  # tracing first: FX proxies
                x = self._attend(q, kv.index_select(1, context_index.reshape(-1)), groups, attn_mask)
            else:  # CPU inference: a piece of groups at a time (see gather_chunk_bytes)
                step = _groups_per_piece(kv, context_index, self.gather_chunk_bytes)
                per_group = q.shape[1] // groups
                pieces = [
                    self._attend(q[:, g * per_group:(g + step) * per_group],
                                 _gather_rows(kv, context_index[g:g + step].reshape(-1)),
                                 min(step, groups - g), None if attn_mask is None else attn_mask[g:g + step])
                    for g in range(0, groups, step)]
                x = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return self.proj_drop(self.proj(x))

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, groups: int, attn_mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """Attention of the projected queries ``(B, Nq, C)`` to the projected keys/values ``(B, groups * K, 2C)``
        (group ``g``'s queries to the ``g``-th ``K`` keys); returns ``(B, Nq, C)`` before the output projection."""
        B, Nq, C = q.shape
        k_len = kv.shape[1] // groups
        q = q.reshape(B * groups, Nq // groups, self.num_heads, self.head_dim).transpose(1, 2)
        kv = kv.reshape(B * groups, k_len, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None:
            attn_mask = attn_mask.reshape(1, groups, 1, 1, k_len).expand(B, -1, -1, -1, -1).flatten(0, 1)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return x.transpose(1, 2).reshape(B, Nq, C)


def _tracing(x: torch.Tensor) -> bool:
    """Whether a graph is being captured (FX, TorchScript tracing, dynamo / torch.export) rather than run."""
    return (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.compiler.is_compiling())


def _gather_rows(kv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``kv.index_select(1, index)`` for a contiguous ``(B, N, D)`` tensor, as one gather of whole rows of its
    ``(B * N, D)`` view: on the CPU 2-3x faster than gathering along dim 1 (same values)."""
    B, N, D = kv.shape
    rows = index[None, :] + torch.arange(B, device=index.device)[:, None] * N
    return kv.reshape(B * N, D).index_select(0, rows.reshape(-1)).view(B, -1, D)


def _groups_per_piece(kv: torch.Tensor, context_index: torch.Tensor, piece_bytes: int) -> int:
    group_bytes = kv.shape[0] * context_index.shape[1] * kv.shape[2] * kv.element_size()
    return max(1, piece_bytes // group_bytes)


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

    def _residual(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        # without the shortcut the attention output *is* the token: dropping it per sample would zero it
        x = x + self.drop_path1(attn) if self.attn_residual else attn
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        context_index: Optional[torch.Tensor] = None,
        *,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``context=None`` is self-attention (``x`` normalised once); ``context_index``, ``attn_mask``: see
        CrossAttention."""
        q = self.norm1(x)
        kv = q if context is None else self.norm1(context)
        return self._residual(x, self.ls1(self.attn(q, kv, context_index, attn_mask=attn_mask)))


class RecoveryBlock(CrossAttentionBlock):
    """STViT-R recovery layer: image tokens (queries) read back from the semantic tokens (keys/values).

    ``forward(image_tokens, semantic_tokens)`` returns a full-resolution token map of the image tokens' shape.
    ``input_fmt`` says what the image tokens are, fixed at construction: ``'NLC'`` a sequence ``(B, N, C)``
    (ViT) or ``'NHWC'`` a map ``(B, H, W, C)`` (Swin).
    """

    def __init__(self, dim: int, num_heads: int, input_fmt: str = "NLC", **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if input_fmt not in ("NLC", "NHWC"):
            raise ValueError(f"input_fmt must be 'NLC' or 'NHWC', got {input_fmt!r}")
        self.input_fmt = input_fmt

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_index=None) -> torch.Tensor:
        if self.input_fmt == "NHWC":
            return super().forward(x.flatten(1, 2), context, context_index).reshape(x.shape)
        return super().forward(x, context, context_index)


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
        q = self.norm1(x).reshape(-1, self.group_size, x.shape[-1])
        return self._residual(x, self.ls1(self.attn(q, q)).reshape(x.shape))


# ----------------------------------------------------------------------------------------------------------
# The semantic token generators (STGM)


def _check_generator_args(depth: int, pool: str) -> None:
    if depth < 1:
        raise ValueError(f"generator depth must be at least 1, got {depth}")
    if pool not in ("max", "avg"):
        raise ValueError(f"unknown semantic token pooling {pool!r} (expected 'max' or 'avg')")


def _generator_layers(dim: int, num_heads: int, depth: int, drop_path: Union[float, Sequence[float]],
                      local_first: bool = False, **block_kwargs: Any) -> nn.ModuleList:
    """The generator's cross-attention layers, one stochastic-depth rate each (a single rate or a list).
    ``local_first``: layer 1 has no attention shortcut (the released local layer)."""
    rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
    return nn.ModuleList(
        CrossAttentionBlock(dim, num_heads, drop_path=rates[i], attn_residual=not (local_first and i == 0),
                            **block_kwargs)
        for i in range(depth)
    )


def _rename_legacy_global_tokens(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: files written before the rename call the parameter ``global_tokens``."""
    if prefix + "global_tokens" in state_dict and prefix + "global_semantic_tokens" not in state_dict:
        state_dict[prefix + "global_semantic_tokens"] = state_dict.pop(prefix + "global_tokens")


def _init_global_semantic_tokens(generator: nn.Module, enabled: bool, num_tokens: int, dim: int) -> None:
    if enabled:
        generator.global_semantic_tokens = nn.Parameter(torch.zeros(1, num_tokens, dim))
        trunc_normal_(generator.global_semantic_tokens, std=0.02)
    else:
        generator.register_parameter("global_semantic_tokens", None)
    generator.register_load_state_dict_pre_hook(_rename_legacy_global_tokens)


def _refine_globally(
    layers: Sequence[nn.Module],
    semantic: torch.Tensor,
    image_tokens: torch.Tensor,
    global_semantic_tokens: Optional[torch.Tensor],
    num_prefix: int = 0,
) -> torch.Tensor:
    """The generator's global layers: queries ``S (+ G)``, keys/values ``concat(S, X)``.

    Global tokens are added to the semantic tokens only, never to the ``num_prefix`` prefix tokens before them.
    """
    for layer in layers:
        queries = semantic
        if global_semantic_tokens is not None:
            if num_prefix:
                queries = torch.cat([semantic[:, :num_prefix], semantic[:, num_prefix:] + global_semantic_tokens], 1)
            else:
                queries = semantic + global_semantic_tokens
        semantic = layer(queries, torch.cat([semantic, image_tokens], dim=1))
    return semantic


class SemanticTokenGenerator(nn.Module):
    """The semantic token generation module (STGM): image tokens in, a few semantic tokens out.

    Args:
        dim, num_heads: as for a transformer block; ``block_kwargs`` (``mlp_ratio``, ``qkv_bias``, ``init_values``,
            ``norm_layer``, ``act_layer``, ``proj_drop``, ``attn_drop``, ``mlp_layer``) go to every
            :class:`CrossAttentionBlock`.
        num_semantic_tokens: a perfect square; initial tokens are the image tokens pooled to that grid.
        depth: number of cross-attention layers (the paper uses 2).
        pool: ``'max'`` (released code) or ``'avg'`` pooling for the initial semantic tokens.
        global_semantic_tokens: learn one global semantic token per semantic token, added to the queries of
            layers 2.. (the paper's "global initialisation"; truncated normal, std 0.02).
        drop_path: one rate per layer, or a single rate.
        num_prefix_tokens: class/register tokens passed as ``prefix_tokens`` (static, so tracing and
            ``torch.compile`` see no data-dependent branch).
        grid_size: the image-token grid ``(H, W)``; the max-pooling bins become an index buffer for it.

    ``forward(image_tokens, grid_size=None, prefix_tokens=None, context=None)`` returns ``concat(prefix, semantic
    tokens)``.
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
        global_semantic_tokens: bool = True,
        drop_path: Union[float, Sequence[float]] = 0.0,
        num_prefix_tokens: int = 0,
        grid_size: Optional[Tuple[int, int]] = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_generator_args(depth, pool)
        self.num_semantic_tokens = num_semantic_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.semantic_grid = semantic_grid(num_semantic_tokens)
        self.pool = pool
        self.layers = _generator_layers(dim, num_heads, depth, drop_path, **block_kwargs)
        _init_global_semantic_tokens(self, global_semantic_tokens and depth > 1, num_semantic_tokens, dim)
        self.grid_size: Optional[Tuple[int, int]] = None
        self.register_buffer("pool_index", None, persistent=False)
        if grid_size is not None:
            self.set_grid_size(grid_size)

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Build for another image-token grid (timm's ``set_input_size``)."""
        if self.num_semantic_tokens > grid_size[0] * grid_size[1]:
            raise ValueError(f"num_semantic_tokens={self.num_semantic_tokens} exceeds the "
                             f"{grid_size[0]}x{grid_size[1]}={grid_size[0] * grid_size[1]} image tokens")
        self.grid_size = tuple(grid_size)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute the pooling index (timm's hook for models built on the meta device)."""
        if self.grid_size is not None and self.pool == "max":
            device = self.layers[0].attn.q.weight.device
            self.pool_index = adaptive_pool_index(self.grid_size, self.semantic_grid, device=device)

    def forward(
        self,
        image_tokens: torch.Tensor,
        grid_size: Optional[Tuple[int, int]] = None,
        prefix_tokens: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``context``: ``concat(prefix_tokens, image_tokens)`` where the caller already holds it (a ViT's token
        sequence), so that layer 1's keys are not concatenated again (a copy of every image token)."""
        if self.pool_index is not None and (grid_size is None or tuple(grid_size) == self.grid_size):
            semantic = gather_max(image_tokens, self.pool_index)
        else:
            grid_size = grid_size or self.grid_size
            if self.num_semantic_tokens > grid_size[0] * grid_size[1]:
                raise ValueError(f"a {grid_size[0]}x{grid_size[1]} token grid is too small for "
                                 f"num_semantic_tokens={self.num_semantic_tokens}")
            semantic = pool_image_tokens(image_tokens, grid_size, self.semantic_grid, self.pool)
        if prefix_tokens is not None:
            semantic = torch.cat([prefix_tokens, semantic], dim=1)
            if context is None:
                context = torch.cat([prefix_tokens, image_tokens], dim=1)
        elif context is None:
            context = image_tokens
        semantic = self.layers[0](semantic, context)
        return _refine_globally(self.layers[1:], semantic, image_tokens, self.global_semantic_tokens,
                                self.num_prefix_tokens)


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: builds index tensors from the traced map's size
def _window_indices_for(x: torch.Tensor, window_size: int, semantic_grid: int, tokens_per_window: int,
                        neighbourhood_size: int, pool: str) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    grid_size = (x.shape[1], x.shape[2])
    pool_index = adaptive_pool_index(grid_size, semantic_grid, window_size, x.device) if pool == "max" else None
    return pool_index, window_context_index(grid_size, window_size, tokens_per_window, neighbourhood_size, x.device)


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: compares the traced number of semantic tokens
def _check_global_tokens(semantic: torch.Tensor, global_semantic_tokens: torch.Tensor) -> None:
    if global_semantic_tokens.shape[1] != semantic.shape[1]:
        raise ValueError(
            f"global semantic tokens were built for {global_semantic_tokens.shape[1]} semantic tokens, this map "
            f"gives {semantic.shape[1]}; build the model for this image size"
        )


class WindowSemanticTokenGenerator(nn.Module):
    """Local STGM (STViT-R on Swin): semantic tokens per window, then refined globally.

    Layer 1 (local): every ``window_size`` window is pooled to ``tokens_per_window`` tokens; these attend to
    themselves plus the image tokens of a ``neighbourhood_size`` neighbourhood around the window, and the
    attention output *replaces* them (no attention shortcut, as released). Layers 2.. (global): queries are
    the semantic tokens (plus learned global semantic tokens if enabled), keys ``concat(S, X)`` over the map.

    ``forward(x)`` takes an NHWC map (windows cover it padded to whole windows; keys never include padding, so
    no mask is needed) and returns ``(B, num_windows * tokens_per_window, C)``, window-major. The map is the
    ``grid_size`` one the generator is built for, whose pooling and key indices are buffers; with
    ``dynamic_size=True`` (or no ``grid_size``) any size, the indices computed per call.
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
        global_semantic_tokens: bool = False,
        num_windows: Optional[int] = None,
        drop_path: Union[float, Sequence[float]] = 0.0,
        grid_size: Optional[Tuple[int, int]] = None,
        dynamic_size: bool = False,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        side = semantic_grid(tokens_per_window)
        if side > window_size:
            raise ValueError(
                f"{tokens_per_window} semantic tokens per window need windows of at least {side}x{side}, "
                f"got window size {window_size}"
            )
        _check_generator_args(depth, pool)
        self.window_size = window_size
        self.tokens_per_window = tokens_per_window
        self.semantic_grid = side
        self.neighbourhood_size = neighbourhood_size or window_size + 3
        self.pool = pool
        self.dynamic_size = dynamic_size
        self.layers = _generator_layers(dim, num_heads, depth, drop_path, local_first=True, **block_kwargs)
        if grid_size is not None:
            num_windows = math.prod(window_grid(grid_size, window_size))
        with_global = global_semantic_tokens and depth > 1
        if with_global and not num_windows:
            raise ValueError("global semantic tokens need grid_size (they are tied to one image size)")
        _init_global_semantic_tokens(self, with_global, (num_windows or 0) * tokens_per_window, dim)
        self.grid_size: Optional[Tuple[int, int]] = None
        self.register_buffer("pool_index", None, persistent=False)
        self.register_buffer("context_index", None, persistent=False)
        if grid_size is not None:
            self.set_grid_size(grid_size)

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Build for another map size (timm's ``set_input_size``)."""
        num_tokens = math.prod(window_grid(grid_size, self.window_size)) * self.tokens_per_window
        if self.global_semantic_tokens is not None and self.global_semantic_tokens.shape[1] != num_tokens:
            raise ValueError(f"global semantic tokens were built for {self.global_semantic_tokens.shape[1]} "
                             f"semantic tokens, a {grid_size[0]}x{grid_size[1]} map gives {num_tokens}")
        self.grid_size = tuple(grid_size)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute the index buffers (timm's hook for models built on the meta device)."""
        if self.grid_size is None:
            return
        device = self.layers[0].attn.q.weight.device
        if self.pool == "max":
            self.pool_index = adaptive_pool_index(self.grid_size, self.semantic_grid, self.window_size, device)
        self.context_index = window_context_index(
            self.grid_size, self.window_size, self.tokens_per_window, self.neighbourhood_size, device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_size or self.grid_size is None:
            pool_index, context_index = _window_indices_for(
                x, self.window_size, self.semantic_grid, self.tokens_per_window, self.neighbourhood_size, self.pool
            )
            pooled = pool_windows(x, self.window_size, self.semantic_grid, self.pool, index=pool_index)
        else:
            pool_index, context_index = self.pool_index, self.context_index
            pooled = pool_windows(x, self.window_size, self.semantic_grid, self.pool, self.grid_size, pool_index)
        image_tokens = x.flatten(1, 2)
        semantic = self.layers[0](pooled, torch.cat([pooled, image_tokens], dim=1), context_index)
        if self.global_semantic_tokens is not None and (self.dynamic_size or self.grid_size is None):
            _check_global_tokens(semantic, self.global_semantic_tokens)
        return _refine_globally(self.layers[1:], semantic, image_tokens, self.global_semantic_tokens)


# ----------------------------------------------------------------------------------------------------------
# STViT-R's dumbbell unit and its layout (one home for every family: DeiT-R, Swin-R)

DUMBBELL_UNIT_DEPTH = 6
#: where each of a unit's six source blocks lives in a :class:`DumbbellUnit`: an image-token block, the two
#: generator layers, two semantic blocks, the recovery layer
DUMBBELL_UNIT_PARTS = ("image_blocks.0", "generator.layers.0", "generator.layers.1",
                       "semantic_blocks.0", "semantic_blocks.1", "recovery")


def dumbbell_block_index(name: str) -> int:
    """Position (0..5) within its unit of the source block a unit's parameter ``name`` comes from (e.g.
    ``'generator.layers.1.attn.q.weight'`` -> 2); the generator's global tokens go with its first layer."""
    for i, part in enumerate(DUMBBELL_UNIT_PARTS):
        if name.startswith(part + "."):
            return i
    family = name.split(".", 1)[0] + "."
    return next(i for i, part in enumerate(DUMBBELL_UNIT_PARTS) if part.startswith(family))


def dumbbell_unit_keys(
    prefix: str, block: int, name: str, value: torch.Tensor, self_attention: Sequence[int] = (0,)
) -> Dict[str, torch.Tensor]:
    """Where parameter ``name`` of source block ``block`` goes in a stack of units at ``prefix`` (e.g.
    ``'blocks.'``): unit ``block // 6``, part ``DUMBBELL_UNIT_PARTS[block % 6]``. Parts at the positions in
    ``self_attention`` keep the source's self-attention (the image block; ViT's semantic blocks too); the others
    are cross-attention layers (``qkv`` split)."""
    unit, position = divmod(block, DUMBBELL_UNIT_DEPTH)
    target = f"{prefix}{unit}.{DUMBBELL_UNIT_PARTS[position]}."
    if position in self_attention:
        return {target + name: value}
    return self_to_cross_attention_keys(target, name, value)


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

    def forward_image_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's first half: the image-token map before the generator (an intermediate feature map)."""
        return self.image_blocks(x)

    def forward_semantic(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The unit's second half, from the image-token map: generator, semantic blocks, recovery.
        ``grid_size``: the token grid of a token *sequence* when it is not the one the generator was built for."""
        semantic = self.generator(x) if grid_size is None else self.generator(x, grid_size)
        return self.recovery(x, self.semantic_blocks(semantic))

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.forward_semantic(self.forward_image_blocks(x), grid_size)
