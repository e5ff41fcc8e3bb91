"""Attention between two token sets, and the pre-norm blocks built on it.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` without masks (fused kernels),
or timm's explicit-softmax path where ``fused_attn`` is off. ``context_index`` makes it local: each group of
queries attends to its own gathered keys (windows' neighbourhoods), with keys and values projected once per
token.
"""

from __future__ import annotations

from typing import Callable, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, use_fused_attn

__all__ = ["CrossAttention", "CrossAttentionBlock", "GroupedSelfAttentionBlock"]


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
