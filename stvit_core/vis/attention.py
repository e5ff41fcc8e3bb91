"""Reading what each semantic token looks at: the generator's cross-attention over the image-token grid.

The paper's semantic tokens are cluster centres: each gathers one region or object part through the
generator's cross-attention (STGM). :func:`semantic_token_attention` reads that attention for a batch of
images, :func:`token_partition` turns it into the hard clustering (every image token to the semantic token
that attends to it most), :func:`attention_on_region` measures how much of it lands on a region.

How the attention is read, without touching the normal forward: for the duration of one call, hooks on the
chosen generator layer's :class:`~stvit_core.layers.CrossAttention` record its inputs (queries, keys/values,
the windows' key indices, the mask) and output, and are removed when the call ends. The probabilities are
recomputed with an explicit softmax from the module's own ``q``/``kv`` weights, ``scale`` and heads; the model
itself keeps running fused SDPA. As a guard against drift between this code and the layer, the output those
probabilities give (``proj(probs @ v)``) must equal what the layer returned, or the call fails.

Why not timm's tools here: ``timm.utils.AttentionExtract`` keeps one tensor per module (the explicit softmax's
output), while mapping a generator layer's keys onto the grid needs the call's ``context``, ``context_index``
and mask, and CPU inference runs a local layer's attention in pieces (a module's last piece only would be
kept); ``timm.layers.set_fused_attn`` is read when a layer is built, so it cannot switch a built model.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import InvalidArgumentError, StvitError
from ..layers import DumbbellUnit, SemanticTokenGenerator, WindowSemanticTokenGenerator

__all__ = [
    "attention_on_region",
    "check_vis_arguments",
    "cross_attention_probabilities",
    "semantic_token_attention",
    "semantic_token_generators",
    "token_partition",
]

# ----------------------------------------------------------------------------------------------------------
# Where the semantic tokens are made


def _architecture(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def semantic_token_generators(model: nn.Module) -> List[nn.Module]:
    """The model's semantic token generators in forward order: one for STViT, one per dumbbell unit for STViT-R.

    Raises InvalidArgumentError for a model without one (not an STViT model).
    """
    found = [m for m in model.modules() if isinstance(m, (SemanticTokenGenerator, WindowSemanticTokenGenerator))]
    if not found:
        raise InvalidArgumentError(f"{_architecture(model)} is not an STViT model: it has no semantic token "
                                   "generator to visualise")
    return found


def _has_units(model: nn.Module) -> bool:
    return any(isinstance(m, DumbbellUnit) for m in model.modules())


def check_vis_arguments(model: nn.Module, layer: Optional[int] = None,
                        unit: Optional[int] = None) -> Tuple[int, Optional[int]]:
    """``(layer, unit)`` with their defaults filled in, or InvalidArgumentError naming what cannot apply.

    ``unit`` (0-based) picks a dumbbell unit of an STViT-R model (default: the last); an STViT model has one
    generator and takes none. ``layer`` (0-based) picks the generator's cross-attention layer (default: the
    last).
    """
    generators = semantic_token_generators(model)
    arch = _architecture(model)
    if not _has_units(model):
        if unit is not None:
            raise InvalidArgumentError(f"{{unit=}} cannot apply: {arch} has a single semantic token generator "
                                       "(dumbbell units are STViT-R's)", unit=unit)
    elif unit is None:
        unit = len(generators) - 1
    elif not 0 <= unit < len(generators):
        raise InvalidArgumentError(f"{{unit=}} is out of range: {arch} has {len(generators)} dumbbell unit(s), "
                                   f"0 to {len(generators) - 1}", unit=unit)
    depth = len(generators[unit or 0].layers)
    if layer is None:
        layer = depth - 1
    elif not 0 <= layer < depth:
        raise InvalidArgumentError(f"{{layer=}} is out of range: the semantic token generator of {arch} has "
                                   f"{depth} layer(s), 0 to {depth - 1}", layer=layer)
    return layer, unit


# ----------------------------------------------------------------------------------------------------------
# Reading the attention


# timm's AttentionExtract does not fit: it keeps one tensor per module, not a call's arguments (see above)
@contextlib.contextmanager
def _recorded_calls(modules: Dict[str, nn.Module]) -> Iterator[Dict[str, Dict[str, Any]]]:
    """Record each module's call arguments (bound to its ``forward`` signature) and output, inside this block
    only: the hooks are removed when it ends, whatever happens."""
    records: Dict[str, Dict[str, Any]] = {}
    handles = []

    def recorder(name: str, module: nn.Module):
        signature = inspect.signature(module.forward)

        def before(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            records[name] = {"arguments": dict(bound.arguments)}

        def after(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            records[name]["output"] = output

        return before, after

    try:
        for name, module in modules.items():
            before, after = recorder(name, module)
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def cross_attention_probabilities(
    attn: nn.Module,
    x: torch.Tensor,
    context: torch.Tensor,
    context_index: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention probabilities of one :class:`~stvit_core.layers.CrossAttention` call, with an explicit
    softmax, and the output they give.

    Returns ``(probs, output)``: ``probs`` ``(B, G, heads, Nq // G, K)`` (``G`` query groups, 1 without
    ``context_index``; row ``g`` attends to the context tokens ``context_index[g]``), ``output`` ``(B, Nq, C)``,
    what the module returns for the same inputs. ``attn_mask`` follows ``scaled_dot_product_attention``
    (boolean: True attends; float: added to the scores).
    """
    B, Nq, C = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    kv = attn.kv(context)
    if context_index is None:
        groups, k_len = 1, context.shape[1]
    else:
        groups, k_len = context_index.shape
        kv = kv.index_select(1, context_index.reshape(-1))
    q = attn.q(x).reshape(B * groups, Nq // groups, heads, head_dim).transpose(1, 2)
    k, v = kv.reshape(B * groups, k_len, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = scores.softmax(dim=-1)
    output = attn.proj((probs @ v).transpose(1, 2).reshape(B, Nq, C))
    return probs.reshape(B, groups, heads, Nq // groups, k_len), output


_REPRODUCED = ("x", "context", "context_index", "attn_mask")


def _recorded_probabilities(attn: nn.Module, call: Dict[str, Any]) -> torch.Tensor:
    """Recompute the probabilities of a recorded call; fail if they do not give the output the layer gave."""
    arguments = call["arguments"]
    extra = [name for name, value in arguments.items() if name not in _REPRODUCED and value is not None]
    if extra:
        raise StvitError(f"cannot read this model's attention: its CrossAttention takes {', '.join(extra)}, which "
                         "stvit_core.vis does not reproduce")
    probs, output = cross_attention_probabilities(
        attn, arguments["x"], arguments["context"], arguments.get("context_index"), arguments.get("attn_mask"))
    expected = call["output"]
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if not torch.allclose(output, expected, rtol=1e-4, atol=tolerance):
        difference = float((output - expected).abs().max())
        raise StvitError(f"cannot read this model's attention: the recomputed attention output differs from the "
                         f"layer's by {difference:.3g} (the layer computes something stvit_core.vis does not know)")
    return probs


def _grid_size(generator: nn.Module, call: Dict[str, Any]) -> Tuple[int, int]:
    """The image-token grid the generator ran on: a windowed generator's NHWC map, else its ``grid_size``."""
    arguments = call["arguments"]
    if isinstance(generator, WindowSemanticTokenGenerator):
        return tuple(arguments["x"].shape[1:3])
    return tuple(arguments.get("grid_size") or generator.grid_size)


def _on_grid(probs: torch.Tensor, context_len: int, context_index: Optional[torch.Tensor],
             grid_size: Tuple[int, int]) -> torch.Tensor:
    """Head-averaged ``(B, G, heads, T, K)`` probabilities -> ``(B, G * T, H, W)`` over the image tokens.

    The image tokens are the last ``H * W`` context tokens; key ``k`` of group ``g`` is context token
    ``context_index[g, k]`` (``k`` without an index). Keys that are not image tokens are left out.
    """
    B, G, _, T, K = probs.shape
    n_image = grid_size[0] * grid_size[1]
    index = torch.arange(K, device=probs.device)[None] if context_index is None else context_index
    offset = context_len - n_image
    is_image = (index >= offset).to(probs.dtype)[None, :, None, :]
    position = (index - offset).clamp(min=0)[None, :, None, :].expand(B, G, T, K)
    on_grid = probs.new_zeros(B, G, T, n_image)
    on_grid.scatter_add_(3, position, probs.mean(2) * is_image)
    return on_grid.reshape(B, G * T, *grid_size)


@torch.no_grad()
def semantic_token_attention(model: nn.Module, images: torch.Tensor, layer: Optional[int] = None,
                             unit: Optional[int] = None) -> torch.Tensor:
    """For each semantic token, its attention over the image-token grid: ``(B, S, H, W)``.

    ``images``: ``(B, 3, H_in, W_in)``, preprocessed as the model expects (its data config's normalisation).
    ``layer``: the generator's cross-attention layer (0-based; default the last); ``unit``: the dumbbell unit
    of an STViT-R model (0-based; default the last). The probabilities are averaged over heads. ``(H, W)`` is
    the grid the generator runs on: the patch grid (DeiT), stage 3's map (Swin).

    Prefix tokens (the class token) are not semantic tokens: their rows are left out. Keys that are not image
    tokens (the class token in layer 0; the semantic tokens in later layers, whose keys are ``concat(S, X)``;
    a window's own pooled tokens in the local layer of STViT-R-Swin) are left out too and the rest is **not
    renormalised**: a token's map sums to the share of its attention that went to image tokens (exactly 1
    only where every key is an image token). Renormalising would blow a token that mostly attends to other
    semantic tokens up into a confident-looking map. Divide by ``attn.sum((-2, -1), keepdim=True)`` for
    per-token distributions.

    STViT-R-Swin: the semantic tokens are per window, window-major (window row, window column, token row,
    token column). In the local layer (``layer=0``) each attends to its window's neighbourhood, scattered
    back to its place on the stage-3 grid (zero elsewhere); in the global layer (``layer=1``) to the whole map.

    The model runs unchanged (fused attention, no lasting hooks); only the chosen layer's probabilities are
    recomputed, and checked to reproduce that layer's output.
    """
    layer, unit = check_vis_arguments(model, layer, unit)
    generator = semantic_token_generators(model)[unit or 0]
    attn = generator.layers[layer].attn
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _recorded_calls({"generator": generator, "attn": attn}) as calls:
            model(images.to(device))
    finally:
        model.train(was_training)
    if "output" not in calls.get("attn", {}):
        raise StvitError(f"cannot read the attention of {_architecture(model)}: its generator did not run")
    probs = _recorded_probabilities(attn, calls["attn"])
    arguments = calls["attn"]["arguments"]
    on_grid = _on_grid(probs, arguments["context"].shape[1], arguments.get("context_index"),
                       _grid_size(generator, calls["generator"]))
    return on_grid[:, getattr(generator, "num_prefix_tokens", 0):]


def token_partition(attn: torch.Tensor) -> torch.Tensor:
    """``(B, S, H, W)`` attention -> ``(B, H, W)`` long: each image token's semantic token, the one that attends
    to it most (the paper's hard clustering; ties go to the lower index)."""
    if attn.ndim != 4:
        raise InvalidArgumentError(f"attn must be (B, S, H, W), got shape {tuple(attn.shape)}")
    return attn.argmax(dim=1)


def attention_on_region(attn: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """How much of the semantic tokens' attention lands on a region of the input, against its size.

    ``attn``: ``(B, S, H, W)`` from :func:`semantic_token_attention`; ``mask``: ``(B, H_in, W_in)``, the region's
    input pixels (bool or weights in [0, 1]). The mask is mapped to the token grid as the fraction of each
    token's pixels it covers. Returns ``(mass, share)``, each ``(B,)``: the part of all the tokens' attention
    on image tokens that falls on the region, and the part of the image the region covers (what attention
    spread evenly would give).
    """
    if mask.ndim != 3 or attn.ndim != 4 or mask.shape[0] != attn.shape[0]:
        raise InvalidArgumentError(f"attn (B, S, H, W) and mask (B, H_in, W_in) do not match: {tuple(attn.shape)}, "
                                   f"{tuple(mask.shape)}")
    coverage = torch.nn.functional.adaptive_avg_pool2d(mask.to(attn.dtype)[:, None], tuple(attn.shape[-2:]))[:, 0]
    mass = (attn * coverage[:, None]).sum((1, 2, 3)) / attn.sum((1, 2, 3))
    return mass, coverage.mean((1, 2))
