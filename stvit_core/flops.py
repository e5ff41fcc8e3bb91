"""FLOPs in the paper's convention: multiply-accumulates (fvcore's "FLOPs"), attention matmuls included.

torch's :class:`~torch.utils.flop_counter.FlopCounterMode` counts ``2 * MACs`` per matmul/conv, and sees
``scaled_dot_product_attention`` only on some backends. Counting under the *math* SDPA backend decomposes
every attention into the two matmuls it performs (``Q K^T`` and ``A V``), which are then counted like any
other matmul, whatever backend runs at inference time. Normalisations, activations and softmax are not
counted (as in fvcore and the paper).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_flops_by_module", "count_params"]


def _input_shape(model: nn.Module, input_size: Union[None, Sequence[int]]) -> Tuple[int, ...]:
    if input_size is None:
        # the size the model was built for (timm models keep it on the patch embedding), else its config's
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            input_size = (input_size[0], *img_size)
    return tuple(int(s) for s in input_size)


@torch.no_grad()
def _count(model: nn.Module, input_size: Union[None, Sequence[int]]) -> FlopCounterMode:
    shape = _input_shape(model, input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((1, *shape), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter


def count_flops(model: nn.Module, input_size: Union[None, Sequence[int]] = None) -> float:
    """GFLOPs (= giga multiply-accumulates) of one forward pass on one image of ``input_size`` (C, H, W).

    ``input_size`` defaults to the size the model was built for (``patch_embed.img_size``), else
    ``pretrained_cfg['input_size']``.
    """
    return _count(model, input_size).get_total_flops() / 2 / 1e9


def count_flops_by_module(model: nn.Module, input_size: Union[None, Sequence[int]] = None) -> Dict[str, float]:
    """GFLOPs per top-level child module (``patch_embed``, ``blocks``, ``semantic_token_generator``...)."""
    counts = _count(model, input_size).get_flop_counts()
    out: Dict[str, float] = {}
    for name, ops in counts.items():
        parts = name.split(".")
        if len(parts) == 2:  # 'Global' is the root; 'Global.child' are the top-level children
            out[parts[1]] = sum(ops.values()) / 2 / 1e9
    return out


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
