"""STViT-R's dumbbell unit and its layout: one home for every family (DeiT-R, Swin-R).

A unit replaces six source blocks, ``DUMBBELL_UNIT_PARTS``: an image-token block, the two generator layers, two
semantic blocks and the recovery layer. The layout serves the checkpoint filters (where a source block's weights
go) and the ``group_matcher`` of the models (at which depth a unit's parameter sits).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "DUMBBELL_UNIT_DEPTH",
    "DUMBBELL_UNIT_PARTS",
    "DumbbellUnit",
    "dumbbell_block_index",
    "dumbbell_unit_keys",
    "self_to_cross_attention_keys",
]

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
