"""Image files as users have them: which files are images, and reading one as the RGB picture it shows.

Every command that reads images goes through here (``predict``, ``vis``, and the datasets of ``finetune`` /
``eval`` through :mod:`stvit_core.data`), so a file reads the same everywhere:

* :data:`IMAGE_EXTENSIONS`: the extensions a folder scan takes. timm's ImageFolder list
  (``timm.data.readers.img_extensions``) plus torchvision's ImageFolder list (.bmp, .ppm, .pgm, .tif, .tiff,
  .webp), kept to those this Pillow can open. Passed to timm's folder reader, so datasets take the same files.
* :func:`read_image`: Pillow, with the EXIF orientation applied (a phone photo stored sideways reads upright),
  16-bit and float images scaled to 8 bits by their range instead of clipped to white, then RGB.
* :func:`find_images`: files as given, the images under each folder (recursively, in natural order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils import natural_key
from torchvision.datasets.folder import IMG_EXTENSIONS as _TORCHVISION_EXTENSIONS

from .errors import DataError, first_line

__all__ = ["IMAGE_EXTENSIONS", "find_images", "no_images_message", "read_image", "to_8_bit"]

PathLike = Union[str, os.PathLike]


def _readable_extensions() -> Tuple[str, ...]:
    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    ordered = dict.fromkeys(e.lower() for e in (*get_img_extensions(), *_TORCHVISION_EXTENSIONS))
    return tuple(e for e in ordered if e in readable)


#: Extensions (lower case, with the dot) that folder scans take.
IMAGE_EXTENSIONS: Tuple[str, ...] = _readable_extensions()

# Pillow modes that hold more than 8 bits per sample; convert("RGB") clips them at 255 (a 16-bit PNG: all white)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as 8-bit grey ("L"), scaled by its range; others unchanged.

    16-bit: ``v / 257`` (65535 -> 255). 32-bit integers (``"I"``): as 16-bit when every value fits in 16 bits
    (how Pillow holds many 16-bit files), else by the largest value. Floats (``"F"``): the usual ``[0, 1]``
    range times 255 when every value lies in it, else clipped to ``[0, 255]``.
    """
    if image.mode not in (*_SIXTEEN_BIT, "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        in_unit_range = finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0) * (255.0 if in_unit_range else 1.0)
    else:
        top = values.max(initial=0)
        values = values * 255.0 / (65535.0 if image.mode in _SIXTEEN_BIT or top <= 65535 else top)
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))  # 2-D uint8: mode "L"


def read_image(path: PathLike) -> Image.Image:
    """The image at ``path`` as RGB, upright (EXIF orientation applied), 8 bits per channel.

    Raises DataError ``cannot read image PATH: REASON`` for a file Pillow cannot decode (missing, broken,
    not an image, a decompression bomb).
    """
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return to_8_bit(upright).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {first_line(e)}") from None


def _images_under(folder: Path) -> List[Path]:
    # a broken symlink is listed too, so that it is reported as unreadable rather than skipped unsaid
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
             and (p.is_file() or (p.is_symlink() and not p.exists()))]
    return sorted(found, key=lambda p: natural_key(str(p.relative_to(folder))))


def find_images(paths: Sequence[PathLike]) -> Tuple[List[Path], List[Dict[str, str]]]:
    """Files as given, and the image files under each folder (recursively, :data:`IMAGE_EXTENSIONS`, natural
    order); plus ``{'image': PATH, 'error': MESSAGE}`` for each path that does not exist and each folder
    without images."""
    images: List[Path] = []
    errors: List[Dict[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = _images_under(path)
            if not found:
                errors.append({"image": str(path), "error": no_images_message(path)})
            images.extend(found)
        elif path.exists():
            images.append(path)
        else:
            errors.append({"image": str(path), "error": f"cannot read {path}: No such file or directory"})
    return images, errors


def no_images_message(folder: PathLike) -> str:
    """What a folder without image files is told: ``no images in FOLDER (.png, .jpg, ...)``."""
    return f"no images in {folder} ({', '.join(IMAGE_EXTENSIONS)})"
