"""The semantic stage of the released STViT-R *detection* backbone: every attention is local.

The released detection code (github.com/changsn/STViT-R-Object-Detection, ``mmdet/models/backbones/layers.py``,
config ``window_sample_size=3, k_window_size_1=14, k_window_size_2=21, restore_k_window_size=27, pad_mask=True``)
keeps the classification model's parameters but lays the dumbbell unit out for large images:

* generator layer 1: each window's pooled tokens attend to the image tokens of a 14x14 neighbourhood centred on
  the window (3 before, 4 after), image tokens only, and keep an attention shortcut;
* generator layer 2: each window's semantic tokens attend to a 21x21 image-token neighbourhood (7 on each side);
* recovery: each window's image tokens attend to the 27x27 neighbourhood of semantic tokens around the window's
  own 3x3 (12 on each side: the semantic tokens of the 9x9 windows around it).

Borders as released: the map is padded to whole windows with zero tokens, neighbourhoods are centred and reach
outside the map, where they hold zero tokens too (after the layer's LayerNorm: its bias). The release masks (adds
-1000 to) the slots outside the padded map, and of the window padding only what ``pad_mask[:, -pad_b:, -pad_r:]``
selects: the bottom-right corner when both pads are non-zero, the padded rows (columns) when only one is, and,
since ``-0:`` selects everything, every slot alike when neither is, which masks nothing. The recovery layer's mask
lives on the semantic-token grid but takes the image grid's pad amounts. :func:`release_padding_mask` reproduces
exactly this; the weights of the released COCO detectors were trained with it.

Unlike the released code, keys and values are projected once per token and then gathered
(``CrossAttention(context_index=...)``), never unfolded first: 133 instead of 241 GMACs for STViT-R-Swin-S at
800x1344. Index and mask buffers are built for a grid size (static shapes) or per call (``dynamic_size``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_notrace_function

from .attention import CrossAttentionBlock
from .pooling import adaptive_pool_index, gather_max, semantic_grid, window_grid
from .semantic import _check_generator_args, _generator_layers

__all__ = [
    "DETECTION_NEIGHBOURHOODS",
    "LocalRecoveryBlock",
    "LocalSemanticTokenGenerator",
    "centred_neighbourhoods",
    "local_image_context",
    "local_semantic_context",
    "release_padding_mask",
    "window_partition_index",
]

#: the released detector's neighbourhood sides: generator layer 1, generator layer 2, recovery
DETECTION_NEIGHBOURHOODS = (14, 21, 27)


def centred_neighbourhoods(num_blocks: int, block: int, size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Positions ``(num_blocks, size)`` of a ``size`` neighbourhood around each ``block``-long block along one
    axis, centred as ``F.pad(left=floor((size - block) / 2))`` + ``F.unfold(size, stride=block)`` centre them
    (may lie outside ``[0, num_blocks * block)``)."""
    starts = torch.arange(num_blocks, device=device) * block - (size - block) // 2
    return starts[:, None] + torch.arange(size, device=device)


def release_padding_mask(rows: torch.Tensor, cols: torch.Tensor, extent: Tuple[int, int],
                         pads: Tuple[int, int]) -> Optional[torch.Tensor]:
    """Which neighbourhood slots take part in attention, as the released detection code masks them.

    ``rows`` ``(nh, n)`` and ``cols`` ``(nw, n)`` are the neighbourhoods' positions on a map of ``extent``
    ``(H, W)``; ``pads`` the window padding ``(pad_b, pad_r)`` the release reads its mask from. Masked: slots
    outside the map, and the slots that ``mask[-pad_b:, -pad_r:]`` selects (Python slicing, ``-0:`` being
    everything). Returns ``(nh * nw, n * n)``, True = attend; a group whose every slot is masked attends to all of
    them (adding -1000 to every logit changes nothing); None where nothing is masked.
    """
    (H, W), (pad_b, pad_r) = extent, pads
    outside = ((rows < 0) | (rows >= H))[:, None, :, None] | ((cols < 0) | (cols >= W))[None, :, None, :]
    in_rows = rows >= H - pad_b if pad_b else torch.ones_like(rows, dtype=torch.bool)
    in_cols = cols >= W - pad_r if pad_r else torch.ones_like(cols, dtype=torch.bool)
    masked = outside | (in_rows[:, None, :, None] & in_cols[None, :, None, :])
    masked = masked.flatten(2).flatten(0, 1)
    attend = ~masked | masked.all(1, keepdim=True)
    return None if bool(attend.all()) else attend


def local_image_context(grid_size: Tuple[int, int], window_size: int, neighbourhood_size: int,
                        device: Optional[torch.device] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each window's centred ``neighbourhood_size`` neighbourhood of image tokens: indices ``(G, n*n)`` into the
    ``H*W`` tokens plus one zero token at ``H*W`` (every slot outside the real map), and the release's mask."""
    H, W = grid_size
    nh, nw = window_grid(grid_size, window_size)
    rows = centred_neighbourhoods(nh, window_size, neighbourhood_size, device)
    cols = centred_neighbourhoods(nw, window_size, neighbourhood_size, device)
    inside = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[None, :, None, :]
    index = (rows[:, None, :, None] * W + cols[None, :, None, :]).masked_fill(~inside, H * W)
    extent = (nh * window_size, nw * window_size)
    mask = release_padding_mask(rows, cols, extent, (extent[0] - H, extent[1] - W))
    return index.flatten(2).flatten(0, 1), mask


def local_semantic_context(grid_size: Tuple[int, int], window_size: int, side: int, neighbourhood_size: int,
                           device: Optional[torch.device] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each window's centred ``neighbourhood_size`` neighbourhood on the semantic-token grid (``side x side``
    tokens per window, stored window by window): indices ``(G, n*n)`` into the ``G * side**2`` semantic tokens
    plus one zero token after them, and the release's mask (built from the *image* grid's window padding)."""
    H, W = grid_size
    nh, nw = window_grid(grid_size, window_size)
    rows = centred_neighbourhoods(nh, side, neighbourhood_size, device)
    cols = centred_neighbourhoods(nw, side, neighbourhood_size, device)
    extent = (nh * side, nw * side)
    inside = ((rows >= 0) & (rows < extent[0]))[:, None, :, None] & ((cols >= 0) & (cols < extent[1]))[None, :, None, :]
    r, c = rows.clamp(min=0)[:, None, :, None], cols.clamp(min=0)[None, :, None, :]
    window_major = ((r // side) * nw + c // side) * side * side + (r % side) * side + c % side
    index = window_major.masked_fill(~inside, nh * nw * side * side)
    pads = (nh * window_size - H, nw * window_size - W)
    return index.flatten(2).flatten(0, 1), release_padding_mask(rows, cols, extent, pads)


def window_partition_index(grid_size: Tuple[int, int], window_size: int,
                           device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(partition, reverse)``: ``partition`` ``(G * window**2,)`` gathers the ``H*W`` tokens (plus a zero token at
    ``H*W`` for the padding) window by window; ``reverse`` ``(H*W,)`` gathers them back from that layout."""
    H, W = grid_size
    nh, nw = window_grid(grid_size, window_size)
    rows = torch.arange(nh * window_size, device=device).reshape(nh, 1, window_size, 1)
    cols = torch.arange(nw * window_size, device=device).reshape(1, nw, 1, window_size)
    partition = (rows * W + cols).masked_fill((rows >= H) | (cols >= W), H * W).flatten()
    reverse = torch.empty(H * W, dtype=torch.long, device=device)
    real = partition < H * W
    reverse[partition[real]] = torch.arange(partition.numel(), device=device)[real]
    return partition, reverse


def _on(device: torch.device, values: Tuple[Optional[torch.Tensor], ...]) -> Tuple[Optional[torch.Tensor], ...]:
    return tuple(None if v is None else v.to(device) for v in values)


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: builds index tensors from the traced map's size
def _generator_indices_for(x: torch.Tensor, window_size: int, semantic_grid: int, sizes: Tuple[int, int]):
    grid = (x.shape[1], x.shape[2])  # built on the CPU: the masks are checked for being all True
    return _on(x.device, (adaptive_pool_index(grid, semantic_grid, window_size),
                          *local_image_context(grid, window_size, sizes[0]),
                          *local_image_context(grid, window_size, sizes[1])))


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: builds index tensors from the traced map's size
def _recovery_indices_for(x: torch.Tensor, window_size: int, side: int, size: int):
    grid = (x.shape[1], x.shape[2])
    return _on(x.device, (*window_partition_index(grid, window_size),
                          *local_semantic_context(grid, window_size, side, size)))


class _GridBuffers(nn.Module):
    """Index/mask buffers built for ``grid_size`` (timm's ``set_input_size`` / meta-device hook), or per call."""

    _buffer_names: Tuple[str, ...] = ()

    def _init_grid(self, grid_size: Optional[Tuple[int, int]], dynamic_size: bool) -> None:
        self.dynamic_size = dynamic_size
        self.grid_size: Optional[Tuple[int, int]] = None
        for name in self._buffer_names:
            self.register_buffer(name, None, persistent=False)
        if grid_size is not None:
            self.set_grid_size(grid_size)

    def set_grid_size(self, grid_size: Tuple[int, int]) -> None:
        """Build for another map size (timm's ``set_input_size``)."""
        self.grid_size = tuple(grid_size)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """(Re)compute the index buffers (timm's hook for models built on the meta device)."""
        if self.grid_size is not None:
            # built on the CPU (masks are checked for being all True), then moved to the parameters' device
            values = _on(next(self.parameters()).device, self._indices(self.grid_size, torch.device("cpu")))
            for name, value in zip(self._buffer_names, values):
                setattr(self, name, value)

    def _buffers_for(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if self.dynamic_size or self.grid_size is None:
            return self._indices_for(x)
        return tuple(getattr(self, name) for name in self._buffer_names)


class LocalSemanticTokenGenerator(_GridBuffers):
    """The detection layout's STGM: both generator layers attend to image-token neighbourhoods of each window.

    Layer 1: every ``window_size`` window (of the map zero-padded to whole windows) is max-pooled to
    ``tokens_per_window`` tokens, which attend to the ``neighbourhood_sizes[0]`` neighbourhood centred on the
    window, with the attention shortcut. Layer 2: each window's semantic tokens attend to the
    ``neighbourhood_sizes[1]`` neighbourhood. Parameters and their names are those of
    :class:`~stvit_core.layers.WindowSemanticTokenGenerator` (two :class:`CrossAttentionBlock` in ``layers``), so
    the same weights load into both layouts. ``forward(x)`` takes an NHWC map and returns
    ``(B, num_windows * tokens_per_window, C)``, window by window.
    """

    _buffer_names = ("pool_index", "context_index", "context_mask", "refine_index", "refine_mask")

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        tokens_per_window: int = 9,
        neighbourhood_sizes: Sequence[int] = DETECTION_NEIGHBOURHOODS[:2],
        drop_path: Union[float, Sequence[float]] = 0.0,
        grid_size: Optional[Tuple[int, int]] = None,
        dynamic_size: bool = False,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_generator_args(2, "max")
        self.window_size = window_size
        self.tokens_per_window = tokens_per_window
        self.semantic_grid = semantic_grid(tokens_per_window)
        self.neighbourhood_sizes = tuple(int(n) for n in neighbourhood_sizes)
        self.layers = _generator_layers(dim, num_heads, 2, drop_path, local_first=False, **block_kwargs)
        self.register_parameter("global_semantic_tokens", None)  # not in the detection layout
        self._init_grid(grid_size, dynamic_size)

    def _indices(self, grid_size: Tuple[int, int], device: torch.device) -> Tuple[Optional[torch.Tensor], ...]:
        return (adaptive_pool_index(grid_size, self.semantic_grid, self.window_size, device),
                *local_image_context(grid_size, self.window_size, self.neighbourhood_sizes[0], device),
                *local_image_context(grid_size, self.window_size, self.neighbourhood_sizes[1], device))

    def _indices_for(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return _generator_indices_for(x, self.window_size, self.semantic_grid, self.neighbourhood_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool_index, index1, mask1, index2, mask2 = self._buffers_for(x)
        # one zero token after the image tokens: the padding of the pooled windows and every neighbourhood slot
        # outside the map (the release's zero padding)
        context = F.pad(x.flatten(1, 2), (0, 0, 0, 1))
        semantic = self.layers[0](gather_max(context, pool_index), context, index1, attn_mask=mask1)
        return self.layers[1](semantic, context, index2, attn_mask=mask2)


class LocalRecoveryBlock(_GridBuffers, CrossAttentionBlock):
    """The detection layout's recovery layer: each window's image tokens attend to the semantic tokens of the
    ``neighbourhood_size`` neighbourhood around the window's own on the semantic-token grid.

    Same parameters as :class:`~stvit_core.layers.RecoveryBlock`. ``forward(x, semantic)`` takes the NHWC
    image-token map and the window-major semantic tokens ``(B, num_windows * side**2, C)``.
    """

    _buffer_names = ("partition_index", "reverse_index", "semantic_index", "semantic_mask")

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, tokens_per_window: int = 9,
                 neighbourhood_size: int = DETECTION_NEIGHBOURHOODS[2], grid_size: Optional[Tuple[int, int]] = None,
                 dynamic_size: bool = False, **kwargs: Any) -> None:
        CrossAttentionBlock.__init__(self, dim, num_heads, **kwargs)
        self.window_size = window_size
        self.semantic_grid = semantic_grid(tokens_per_window)
        self.neighbourhood_size = int(neighbourhood_size)
        self._init_grid(grid_size, dynamic_size)

    def _indices(self, grid_size: Tuple[int, int], device: torch.device) -> Tuple[Optional[torch.Tensor], ...]:
        return (*window_partition_index(grid_size, self.window_size, device),
                *local_semantic_context(grid_size, self.window_size, self.semantic_grid, self.neighbourhood_size,
                                        device))

    def _indices_for(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        return _recovery_indices_for(x, self.window_size, self.semantic_grid, self.neighbourhood_size)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,  # type: ignore[override]
                context_index: Optional[torch.Tensor] = None, *, attn_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        if context is None or context_index is not None or attn_mask is not None:
            raise ValueError("LocalRecoveryBlock takes the image-token map and the semantic tokens only")
        partition, reverse, index, mask = self._buffers_for(x)
        tokens = x.flatten(1, 2)
        # queries window by window (padding: any token, its output is dropped); keys: the semantic tokens plus a
        # zero token for the slots outside the semantic grid
        queries = F.pad(self.norm1(tokens), (0, 0, 0, 1)).index_select(1, partition)
        keys = self.norm1(F.pad(context, (0, 0, 0, 1)))
        attn = self.attn(queries, keys, index, attn_mask=mask).index_select(1, reverse)
        tokens = tokens + self.drop_path1(self.ls1(attn))
        tokens = tokens + self.drop_path2(self.ls2(self.mlp(self.norm2(tokens))))
        return tokens.reshape(x.shape)
