"""A small real-image detection set: Fashion-MNIST items pasted at known boxes onto real photos.

Every image is a random crop of one of four photos shipped in ``data/detection_backgrounds`` (public domain /
CC0, see the NOTICE there), with 1-3 items of the embedded Fashion-MNIST subset (MIT) pasted at random scales
and positions. An item's grey level is its opacity, so boxes and masks are exact: the box is the tight box of
the item's visible pixels, the mask its opaque pixels. Images are built on the fly from ``(seed, index)``, so
the set is deterministic, needs no files beyond the embedded ones, and any number of images can be drawn.

Samples follow torchvision's detection convention: ``(image, target)`` with ``image`` a float tensor
``(3, H, W)`` in [0, 1] and ``target`` a dict of ``boxes`` (``(N, 4)`` float, ``x1, y1, x2, y2`` in pixels),
``labels`` (``(N,)`` int64, 1-based: 0 is background), ``masks`` (``(N, H, W)`` uint8) and ``image_id``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from .data import embedded_dataset_path, folder_classes, split_folder
from .errors import DataError, InvalidArgumentError

__all__ = ["BACKGROUNDS_PATH", "PastedObjectsDataset", "detection_collate"]

BACKGROUNDS_PATH = Path(__file__).resolve().parent / "data" / "detection_backgrounds"
_BOX_OPACITY = 0.25  # pixels at least this opaque are part of the object's box
_MASK_OPACITY = 0.5  # and at least this opaque, of its mask
_MAX_IOU = 0.1  # pasted objects overlap at most this much, so every box stays visible
_PLACEMENT_TRIES = 20


@lru_cache(maxsize=None)  # read once per process; the arrays are only read
def _load_backgrounds() -> Tuple[np.ndarray, ...]:
    paths = sorted(BACKGROUNDS_PATH.glob("*.jpg"))
    if not paths:
        raise DataError(f"the detection background photos are missing from this installation ({BACKGROUNDS_PATH})")
    out = []
    for path in paths:
        with Image.open(path) as img:
            out.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
    return tuple(out)


@lru_cache(maxsize=None)
def _load_items(split: str, classes: Tuple[str, ...]) -> Tuple[Tuple[np.ndarray, ...], Tuple[int, ...]]:
    folder = split_folder(embedded_dataset_path(), split)
    items, labels = [], []
    for label, name in enumerate(classes, start=1):
        for path in sorted((folder / name).glob("*.png")):
            with Image.open(path) as img:
                items.append(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
            labels.append(label)
    return tuple(items), tuple(labels)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _crop_background(photo: np.ndarray, size: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` crop of ``photo`` (upscaled first when the photo is smaller), randomly mirrored."""
    h, w = size
    if photo.shape[0] < h or photo.shape[1] < w:
        scale = max(h / photo.shape[0], w / photo.shape[1])
        new = (int(np.ceil(photo.shape[1] * scale)), int(np.ceil(photo.shape[0] * scale)))
        photo = np.asarray(Image.fromarray((photo * 255).astype(np.uint8)).resize(new, Image.Resampling.BILINEAR),
                           dtype=np.float32) / 255.0
    top = int(rng.integers(0, photo.shape[0] - h + 1))
    left = int(rng.integers(0, photo.shape[1] - w + 1))
    crop = photo[top:top + h, left:left + w]
    return crop[:, ::-1].copy() if rng.random() < 0.5 else crop.copy()


def _scaled_opacity(item: np.ndarray, side: int) -> np.ndarray:
    """The 28x28 item resized to ``side`` pixels; grey level doubled and clipped, so items are mostly opaque."""
    resized = Image.fromarray((item * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32) / 255.0 * 2.0, 0.0, 1.0)


class PastedObjectsDataset(torch.utils.data.Dataset):
    """Fashion-MNIST items pasted onto real photos at known boxes (deterministic, built on the fly).

    Args:
        split: ``'train'`` or ``'val'``: which half of the embedded Fashion-MNIST subset the items come from
            (200 / 50 per class), so a validation set shows unseen items.
        num_images: length of the dataset.
        image_size: ``(low, high)``: each image's height and width are drawn from this range (odd sizes
            included), or one ``int`` for square images of that size.
        object_size: ``(low, high)`` side in pixels of a pasted item (the 28x28 item is scaled to it).
        objects_per_image: ``(low, high)`` number of items per image.
        classes: Fashion-MNIST class names to use (default all ten, in folder order); labels are their
            1-based positions in this list.
        seed: the set is a function of ``(seed, index)``.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 256,
        image_size: "int | Tuple[int, int]" = (128, 192),
        object_size: Tuple[int, int] = (32, 72),
        objects_per_image: Tuple[int, int] = (1, 3),
        classes: Optional[Sequence[str]] = None,
        seed: int = 0,
    ) -> None:
        all_classes = folder_classes(split_folder(embedded_dataset_path(), "train"))
        self.classes = list(classes) if classes is not None else all_classes
        unknown = [c for c in self.classes if c not in all_classes]
        if unknown or not self.classes:
            raise InvalidArgumentError(f"unknown Fashion-MNIST classes {unknown}; choose from {all_classes}")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.object_size = tuple(object_size)
        self.objects_per_image = tuple(objects_per_image)
        if num_images < 1 or not 1 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            raise InvalidArgumentError("num_images and objects_per_image must be positive")
        if not 8 <= self.object_size[0] <= self.object_size[1] <= self.image_size[0]:
            raise InvalidArgumentError(
                f"object_size {self.object_size} must lie between 8 pixels and the smallest image side "
                f"{self.image_size[0]}"
            )
        self.num_images = num_images
        self.seed = seed
        self.split = split
        self.backgrounds = _load_backgrounds()
        self.items, self.item_labels = _load_items(split, tuple(self.classes))

    def __len__(self) -> int:
        return self.num_images

    @property
    def num_classes(self) -> int:
        """Number of object classes plus one for the background, as torchvision's detectors count them."""
        return len(self.classes) + 1

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index, 0 if self.split == "train" else 1])
        h, w = (int(rng.integers(self.image_size[0], self.image_size[1] + 1)) for _ in range(2))
        image = _crop_background(self.backgrounds[int(rng.integers(len(self.backgrounds)))], (h, w), rng)
        boxes: List[np.ndarray] = []
        labels: List[int] = []
        masks: List[np.ndarray] = []
        for _ in range(int(rng.integers(self.objects_per_image[0], self.objects_per_image[1] + 1))):
            pasted = self._paste_one(image, boxes, rng)
            if pasted is not None:
                boxes.append(pasted[0]), labels.append(pasted[1]), masks.append(pasted[2])
        target = {
            "boxes": torch.from_numpy(np.stack(boxes)).float(),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)),
            "image_id": torch.tensor(index),
        }
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), target

    def _paste_one(self, image: np.ndarray, boxes: List[np.ndarray], rng: np.random.Generator):
        """Paste a random item into ``image`` (in place) where it overlaps no earlier box by more than
        ``_MAX_IOU``; returns ``(box, label, mask)``, or None when no such place was found."""
        k = int(rng.integers(len(self.items)))
        side = int(rng.integers(self.object_size[0], self.object_size[1] + 1))
        opacity = _scaled_opacity(self.items[k], side)
        rows, cols = np.nonzero(opacity >= _BOX_OPACITY)
        colour = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
        H, W = image.shape[:2]
        for _ in range(_PLACEMENT_TRIES):
            top, left = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
            box = np.array([left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1],
                           dtype=np.float32)
            if all(_box_iou(box, other) <= _MAX_IOU for other in boxes):
                break
        else:
            return None
        alpha = opacity[:, :, None]
        patch = image[top:top + side, left:left + side]
        patch[:] = patch * (1 - alpha) + alpha * colour * (0.4 + 0.6 * alpha)
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[top:top + side, left:left + side] = opacity >= _MASK_OPACITY
        return box, self.item_labels[k], mask


def detection_collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]):
    """Images and targets as two lists (torchvision's detectors take lists of differently sized images)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
