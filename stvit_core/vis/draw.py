"""Drawing what the semantic tokens look at (Pillow): one figure per image, and a contact sheet.

The figures are composed pixel by pixel at exact sizes with Pillow (a dependency of torchvision and timm
already), which needs no plotting library.
"""

from __future__ import annotations

import colorsys
import math
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InvalidArgumentError

__all__ = ["FILLS", "contact_sheet_size", "figure_size", "render_contact_sheet", "render_figure"]

FILLS = ("colour", "mean")

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
    :func:`~stvit_core.vis.semantic_token_attention`; ``partition``: ``(H, W)`` from :func:`~stvit_core.vis.token_partition`. Heat maps share
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
