"""Pooling as a static gather, and the index maths of windows and their neighbourhoods.

Adaptive max pooling is a gather of each bin's positions followed by a max (:func:`gather_max`), the same values
as ``F.adaptive_max_pool2d`` and exportable (ONNX has no adaptive max pooling). Every index depends on the
token grid only, so the models compute them once when the grid size is set and keep them as buffers.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple

from ..errors import InvalidArgumentError

__all__ = [
    "adaptive_pool_index",
    "gather_max",
    "pool_image_tokens",
    "pool_windows",
    "semantic_grid",
    "window_context_index",
    "window_grid",
    "window_neighbourhood_index",
]


def semantic_grid(num_semantic_tokens: int) -> int:
    """Side of the square grid of ``num_semantic_tokens`` semantic tokens (16 -> 4, 36 -> 6, ...)."""
    side = math.isqrt(num_semantic_tokens)
    if num_semantic_tokens < 1 or side * side != num_semantic_tokens:
        raise InvalidArgumentError(f"{{num_semantic_tokens}} must be a perfect square (4, 9, 16, 36, ...), got "
                                   f"{num_semantic_tokens}", num_semantic_tokens=num_semantic_tokens)
    return side



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

