"""What each semantic token looks at: its attention over the image-token grid, and the partition it implies.

The paper's semantic tokens are cluster centres: each gathers one region or object part through the
generator's cross-attention (STGM). :func:`semantic_token_attention` reads that attention for a batch of
images, :func:`token_partition` turns it into the hard clustering (every image token to the semantic token
that attends to it most), and :func:`visualise_images` draws both (``stvit vis``).

How the attention is read, without touching the normal forward: for the duration of one call, hooks on the
chosen generator layer's :class:`~stvit_core.layers.CrossAttention` record its inputs (queries, keys/values,
the windows' key indices) and output, and are removed when the call ends. The probabilities are then
recomputed here with an explicit softmax from the module's own ``q``/``kv`` weights, ``scale`` and heads;
the model itself keeps running fused SDPA. As a guard against drift between this code and the layer, the
output those probabilities give (``proj(probs @ v)``) must equal what the layer returned, or the call fails.

Images are drawn with Pillow (a dependency of torchvision and timm already): the figures are composed
pixel by pixel at exact sizes, which needs no plotting library.
"""

from __future__ import annotations

import colorsys
import contextlib
import inspect
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

from .errors import DataError, InvalidArgumentError, StvitError

__all__ = [
    "CONTACT_SHEET_NAME",
    "FILLS",
    "ImageSource",
    "attention_on_region",
    "check_vis_arguments",
    "contact_sheet_size",
    "cross_attention_probabilities",
    "figure_size",
    "image_sources",
    "render_contact_sheet",
    "render_figure",
    "semantic_token_attention",
    "semantic_token_generators",
    "token_partition",
    "visualise_images",
]

PathLike = Union[str, os.PathLike]
FILLS = ("colour", "mean")
CONTACT_SHEET_NAME = "contact-sheet"

# ----------------------------------------------------------------------------------------------------------
# Where the semantic tokens are made


def _architecture(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def semantic_token_generators(model: nn.Module) -> List[nn.Module]:
    """The model's semantic token generators in forward order: one for STViT, one per dumbbell unit for STViT-R.

    Raises InvalidArgumentError for a model without one (not an STViT model).
    """
    from .layers import SemanticTokenGenerator, WindowSemanticTokenGenerator

    found = [m for m in model.modules() if isinstance(m, (SemanticTokenGenerator, WindowSemanticTokenGenerator))]
    if not found:
        raise InvalidArgumentError(f"{_architecture(model)} is not an STViT model: it has no semantic token "
                                   "generator to visualise")
    return found


def _has_units(model: nn.Module) -> bool:
    from .layers import DumbbellUnit

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
            raise InvalidArgumentError(f"unit={unit} cannot apply: {arch} has a single semantic token generator "
                                       "(dumbbell units are STViT-R's)")
    elif unit is None:
        unit = len(generators) - 1
    elif not 0 <= unit < len(generators):
        raise InvalidArgumentError(f"unit={unit} is out of range: {arch} has {len(generators)} dumbbell unit(s), "
                                   f"0 to {len(generators) - 1}")
    depth = len(generators[unit or 0].layers)
    if layer is None:
        layer = depth - 1
    elif not 0 <= layer < depth:
        raise InvalidArgumentError(f"layer={layer} is out of range: the semantic token generator of {arch} has "
                                   f"{depth} layer(s), 0 to {depth - 1}")
    return layer, unit


# ----------------------------------------------------------------------------------------------------------
# Reading the attention


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
    from .layers import WindowSemanticTokenGenerator

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


# ----------------------------------------------------------------------------------------------------------
# Drawing (Pillow): one figure per image, and a contact sheet

PANEL = 224  # side of the input and partition panels
THUMB = 96  # side of one token's heat map
SHEET_PANEL = 112  # side of a panel in the contact sheet
GAP, MARGIN, TITLE = 4, 8, 18
# matplotlib's 'inferno' at 9 evenly spaced points (a perceptually uniform map, readable in grey)
_INFERNO = np.array([(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51),
                     (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float64)


def _heat_grid(num_tokens: int) -> Tuple[int, int]:
    cols = math.ceil(math.sqrt(num_tokens))
    return cols, math.ceil(num_tokens / cols)


def figure_size(num_tokens: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of the figure :func:`render_figure` draws for ``num_tokens`` tokens."""
    cols, rows = _heat_grid(num_tokens)
    grid_w, grid_h = cols * THUMB + (cols - 1) * GAP, rows * THUMB + (rows - 1) * GAP
    return 4 * MARGIN + 2 * PANEL + grid_w, TITLE + 2 * MARGIN + max(PANEL, grid_h)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _palette(n: int) -> np.ndarray:
    """``n`` distinct colours: hues a golden angle apart, two brightness levels alternating."""
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0 if i % 2 == 0 else 0.8) for i in range(n)]
    return (np.array(colours) * 255).round().astype(np.uint8)


def _inferno(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 through the inferno colour map."""
    position = np.clip(values, 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.minimum(position.astype(int), len(_INFERNO) - 2)
    weight = (position - low)[..., None]
    return ((1 - weight) * _INFERNO[low] + weight * _INFERNO[low + 1]).round().astype(np.uint8)


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """Scale an ``(h, w, 3)`` uint8 image to fit a ``side`` square: whole-number pixel repeats when it is
    smaller (a 32 px input stays sharp), Pillow's bicubic otherwise."""
    h, w = image.shape[:2]
    if max(h, w) <= side:
        k = side // max(h, w)
        return image.repeat(k, axis=0).repeat(k, axis=1)
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a token grid to ``(height, width)`` pixels (each token one block)."""
    rows = np.arange(height) * grid.shape[0] // height
    cols = np.arange(width) * grid.shape[1] // width
    return grid[rows[:, None], cols[None, :]]


def _outlined(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """White lines where neighbouring pixels belong to different regions."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    out = image.copy()
    out[edge] = 255
    return out


def _partition_panel(image: np.ndarray, partition: np.ndarray, fill: str, palette: np.ndarray) -> np.ndarray:
    """Regions over the image: each a colour blended in (``'colour'``) or the mean colour of the pixels it
    covers (``'mean'``, as ToMe draws merged tokens), outlined."""
    labels = _upsample(partition, *image.shape[:2])
    if fill == "mean":
        flat, counts = labels.reshape(-1), np.bincount(labels.reshape(-1), minlength=len(palette))
        sums = np.stack([np.bincount(flat, image[..., c].reshape(-1), len(palette)) for c in range(3)], 1)
        means = (sums / np.maximum(counts, 1)[:, None]).round().astype(np.uint8)
        filled = means[labels]
    else:
        filled = (0.5 * image + 0.5 * palette[labels]).round().astype(np.uint8)
    return _outlined(filled, labels)


def _heat_thumbnail(image: np.ndarray, attention: np.ndarray, scale: float) -> np.ndarray:
    """One token's attention (nearest-upsampled, on the shared ``scale``) over a dimmed grey copy of the image."""
    small = _fit(image, THUMB)
    grey = small.mean(axis=2, keepdims=True).repeat(3, axis=2)
    heat = _inferno(_upsample(attention, *small.shape[:2]) / scale)
    return (0.35 * grey + 0.65 * heat).round().astype(np.uint8)


def _paste(canvas: Image.Image, array: np.ndarray, x: int, y: int, side: int) -> None:
    """Paste an image centred in the ``side`` square at ``(x, y)``."""
    h, w = array.shape[:2]
    canvas.paste(Image.fromarray(array), (x + (side - w) // 2, y + (side - h) // 2))


def render_figure(image: np.ndarray, attention: np.ndarray, partition: np.ndarray, fill: str = "colour",
                  title: str = "") -> Image.Image:
    """The figure for one image: the input, the partition overlay, and one heat map per semantic token.

    ``image``: ``(H_in, W_in, 3)`` uint8 as the model sees it; ``attention``: ``(S, H, W)`` from
    :func:`semantic_token_attention`; ``partition``: ``(H, W)`` from :func:`token_partition`. Heat maps share
    one colour scale (black 0, yellow the largest value of any token); each is framed in its region's colour
    and labelled with its index and its attention share on image tokens. Size: :func:`figure_size`.
    """
    if fill not in FILLS:
        raise InvalidArgumentError(f"fill={fill!r} is not one of {', '.join(FILLS)}")
    num_tokens = attention.shape[0]
    palette = _palette(num_tokens)
    canvas = Image.new("RGB", figure_size(num_tokens), (24, 24, 24))
    draw, font = ImageDraw.Draw(canvas), _font()
    shown = _fit(image, PANEL)
    top = TITLE + MARGIN
    _paste(canvas, shown, MARGIN, top, PANEL)
    _paste(canvas, _partition_panel(shown, partition, fill, palette), 2 * MARGIN + PANEL, top, PANEL)
    draw.text((MARGIN, 3), title or "input, as the model sees it", fill=(230, 230, 230), font=font)
    draw.text((2 * MARGIN + PANEL, 3), f"partition: {len(np.unique(partition))} of {num_tokens} tokens",
              fill=(230, 230, 230), font=font)
    scale = max(float(attention.max()), 1e-12)
    left = 3 * MARGIN + 2 * PANEL
    draw.text((left, 3), f"attention of each semantic token (scale 0 to {scale:.3f})", fill=(230, 230, 230), font=font)
    cols, _ = _heat_grid(num_tokens)
    for s in range(num_tokens):
        x, y = left + (s % cols) * (THUMB + GAP), top + (s // cols) * (THUMB + GAP)
        _paste(canvas, _heat_thumbnail(image, attention[s], scale), x, y, THUMB)
        colour = tuple(int(c) for c in palette[s])
        draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), outline=colour, width=2)
        # index top left, share of attention on image tokens top right (the default font has narrow spaces)
        share = f"{100 * float(attention[s].sum()):.0f}%"
        for position, text in (((x + 4, y + 3), f"#{s}"), ((x + THUMB - 4 - draw.textlength(share, font=font), y + 3),
                                                          share)):
            draw.text(position, text, fill=colour, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return canvas


def contact_sheet_size(num_images: int) -> Tuple[int, int]:
    """``(width, height)`` of the contact sheet :func:`render_contact_sheet` draws for ``num_images`` images."""
    cols = math.ceil(math.sqrt(num_images))
    rows = math.ceil(num_images / cols)
    entry_w, entry_h = 2 * SHEET_PANEL + GAP, SHEET_PANEL + TITLE
    return MARGIN + cols * (entry_w + MARGIN), MARGIN + rows * (entry_h + MARGIN)


def render_contact_sheet(entries: Sequence[Tuple[str, np.ndarray, np.ndarray]], fill: str = "colour") -> Image.Image:
    """Many images on one sheet: for each ``(name, image, partition)`` the input and its partition, captioned."""
    if not entries:
        raise InvalidArgumentError("a contact sheet needs at least one image")
    canvas = Image.new("RGB", contact_sheet_size(len(entries)), (24, 24, 24))
    draw, font = ImageDraw.Draw(canvas), _font(11)
    cols = math.ceil(math.sqrt(len(entries)))
    palette = _palette(int(max(int(p.max()) for _, _, p in entries)) + 1)
    for i, (name, image, partition) in enumerate(entries):
        x = MARGIN + (i % cols) * (2 * SHEET_PANEL + GAP + MARGIN)
        y = MARGIN + (i // cols) * (SHEET_PANEL + TITLE + MARGIN)
        shown = _fit(image, SHEET_PANEL)
        draw.text((x, y + 2), name[:36], fill=(230, 230, 230), font=font)
        _paste(canvas, shown, x, y + TITLE, SHEET_PANEL)
        _paste(canvas, _partition_panel(shown, partition, fill, palette), x + SHEET_PANEL + GAP, y + TITLE, SHEET_PANEL)
    return canvas


# ----------------------------------------------------------------------------------------------------------
# Files: which images, and the figures written for them


@dataclass(frozen=True)
class ImageSource:
    """An image to draw: its file and the name of its figure (``NAME.png`` in the output folder)."""

    path: Path
    name: str


def _image_extensions() -> Tuple[str, ...]:
    from timm.data.readers.img_extensions import get_img_extensions

    return tuple(get_img_extensions())


def image_sources(paths: Sequence[PathLike]) -> Tuple[List[ImageSource], List[str]]:
    """Image files from files and folders (searched recursively, in sorted order), and one message per path
    that gives none (missing, or a folder without images).

    Figure names are the file's stem (its path below the folder, ``/`` as ``_``, for files found in a
    folder); repeated names get ``-2``, ``-3``...; the contact sheet's name is never used for an image.
    """
    found: List[Tuple[Path, str]] = []
    problems: List[str] = []
    extensions = _image_extensions()
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not files:
                problems.append(f"no images in {given} (looked for {', '.join(extensions)})")
            found += [(p, "_".join(p.relative_to(given).with_suffix("").parts)) for p in files]
        elif given.exists():
            found.append((given, given.stem))
        else:
            problems.append(f"cannot read {given}: No such file or directory")
    used = {CONTACT_SHEET_NAME}
    sources = []
    for path, name in found:
        unique, n = name, 1
        while unique in used:
            n += 1
            unique = f"{name}-{n}"
        used.add(unique)
        sources.append(ImageSource(path, unique))
    return sources, problems


def _load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def _write_png(image: Image.Image, path: Path) -> None:
    from .checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())


def _make_output(output: Path) -> List[Path]:
    """Create ``output`` (and missing parents); return what was created, deepest first, to undo it."""
    created = [p for p in (output, *output.parents) if not p.exists()]
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise StvitError(f"cannot write {output}: {e.strerror or e}") from None
    return created


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


@dataclass
class _Preprocessing:
    transform: Any
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module) -> "_Preprocessing":
        from .data import build_transform, model_data_config

        config = model_data_config(model)
        return cls(build_transform(config, training=False), torch.tensor(config["mean"]).view(3, 1, 1),
                   torch.tensor(config["std"]).view(3, 1, 1))

    def shown(self, tensor: torch.Tensor) -> np.ndarray:
        """The model's input un-normalised: ``(H, W, 3)`` uint8, the image as the model sees it."""
        rgb = (tensor.cpu() * self.std + self.mean).clamp(0, 1)
        return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _render_batch(model: nn.Module, batch: List[Tuple[ImageSource, torch.Tensor]], prep: _Preprocessing,
                  output: Path, settings: Dict[str, Any], sheet: Optional[list]) -> List[Dict[str, Any]]:
    images = torch.stack([tensor for _, tensor in batch])
    attention = semantic_token_attention(model, images, settings["layer"], settings["unit"]).float().cpu()
    settings.update(tokens=attention.shape[1], grid_size=list(attention.shape[2:]))
    partition = token_partition(attention)
    written = []
    for (source, tensor), attn, part in zip(batch, attention.numpy(), partition.numpy()):
        shown = prep.shown(tensor)
        path = output / f"{source.name}.png"
        _write_png(render_figure(shown, attn, part, settings["fill"], title=source.path.name), path)
        written.append({"image": str(source.path), "file": str(path)})
        if sheet is not None:
            sheet.append((source.path.name, shown, part))
    return written


def visualise_images(
    model: nn.Module,
    sources: Sequence[ImageSource],
    output: PathLike,
    *,
    layer: Optional[int] = None,
    unit: Optional[int] = None,
    fill: str = "colour",
    sheet: bool = False,
    batch_size: int = 16,
    on_image: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Write ``OUTPUT/NAME.png`` (:func:`render_figure`) for every source, and ``contact-sheet.png`` with ``sheet``.

    The model runs on the device its parameters are on, with its own preprocessing. An image that cannot be
    read does not stop the others: it is reported (``{'image', 'error'}``) and skipped. Files are written
    under a temporary name and renamed; ``output`` is created if needed and removed again when no figure could
    be written. ``on_image`` is called once per source with ``{'image', 'file'}`` or ``{'image', 'error'}``.
    Returns ``{'files', 'sheet', 'failed', 'layer', 'unit', 'tokens', 'grid_size'}``.
    """
    if fill not in FILLS:
        raise InvalidArgumentError(f"fill={fill!r} is not one of {', '.join(FILLS)}")
    layer, unit = check_vis_arguments(model, layer, unit)
    settings = {"layer": layer, "unit": unit, "fill": fill}
    prep, output = _Preprocessing.of(model), Path(output)
    created = _make_output(output) if sources else []
    report: Dict[str, Any] = {"files": [], "sheet": None, "failed": [], "layer": layer, "unit": unit,
                              "tokens": None, "grid_size": None}
    entries: Optional[list] = [] if sheet else None
    notify = on_image or (lambda record: None)
    try:
        for start in range(0, len(sources), batch_size):
            batch = []
            for source in sources[start:start + batch_size]:
                try:
                    batch.append((source, prep.transform(_load_image(source.path))))
                except DataError as e:
                    report["failed"].append({"image": str(source.path), "error": str(e)})
                    notify(report["failed"][-1])
            if batch:
                for record in _render_batch(model, batch, prep, output, settings, entries):
                    report["files"].append(record["file"])
                    notify(record)
        report.update(tokens=settings.get("tokens"), grid_size=settings.get("grid_size"))
        if entries:
            report["sheet"] = str(output / f"{CONTACT_SHEET_NAME}.png")
            _write_png(render_contact_sheet(entries, fill), Path(report["sheet"]))
    finally:
        if not report["files"]:  # nothing to show for it: leave no empty folder behind
            _remove_empty(created)
    return report
