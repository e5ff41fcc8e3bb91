"""The semantic token generators (the paper's STGM) and the recovery layer (STViT-R).

Vocabulary (STViT, Chang et al., CVPR 2023):

* *image tokens* ``X``: the patch tokens of the backbone, laid out on a ``grid_size`` ``(H, W)`` grid.
* *semantic tokens* ``S``: a handful of cluster centres that replace the image tokens in later layers. They
  start as the image tokens pooled to a ``semantic_grid x semantic_grid`` grid (per window for Swin).
* :class:`SemanticTokenGenerator` (the paper's STGM): cross-attention layers (queries: semantic tokens,
  keys/values: image tokens) refine the pooled tokens. Layer 1 attends to ``X``; later layers attend to
  ``concat(S, X)`` and may add learned *global semantic tokens* ``G`` to their queries. ``X`` is not updated.
* :class:`RecoveryBlock` (STViT-R): queries are the image tokens saved before the generator, keys/values the
  semantic tokens; it rebuilds a full-resolution token map for dense tasks.

Every shape that depends on the image size (the pooling bins, the windows' key indices) is an index buffer
computed when the grid size is set, so the graph is static: ``torch.fx``, ``torch.compile(fullgraph=True)``,
``torch.export`` and ONNX see gathers, not shape-dependent Python.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import register_notrace_function

from ..errors import InvalidArgumentError
from .attention import CrossAttentionBlock
from .pooling import (
    adaptive_pool_index,
    gather_max,
    pool_image_tokens,
    pool_windows,
    semantic_grid,
    window_context_index,
    window_grid,
)

__all__ = ["RecoveryBlock", "SemanticTokenGenerator", "WindowSemanticTokenGenerator"]


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

def _init_global_semantic_tokens(generator: nn.Module, enabled: bool, num_tokens: int, dim: int) -> None:
    if enabled:
        generator.global_semantic_tokens = nn.Parameter(torch.zeros(1, num_tokens, dim))
        trunc_normal_(generator.global_semantic_tokens, std=0.02)
    else:
        generator.register_parameter("global_semantic_tokens", None)


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
            raise InvalidArgumentError(f"{{num_semantic_tokens=}} exceeds the {grid_size[0]}x{grid_size[1]}="
                                       f"{grid_size[0] * grid_size[1]} image tokens",
                                       num_semantic_tokens=self.num_semantic_tokens)
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


