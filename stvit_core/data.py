"""Datasets and transforms: a thin layer over ``timm.data``, plus the embedded Fashion-MNIST subset.

Layout: an ImageFolder tree, ``ROOT/{train,val}/<class_name>/*.png|jpg|...`` (ImageNet's layout; timm's
split synonyms ``validation``/``val``/``eval`` are accepted). Class indices are the folder names in timm's
natural sort order unless a ``class_map`` (name -> index) is given, e.g. the ImageNet-1k synset order.

Images are read by :func:`stvit_core.images.read_image` (upright, 8-bit RGB), so grey images such as
Fashion-MNIST feed an RGB model as three equal channels; folders take :data:`stvit_core.images.IMAGE_EXTENSIONS`.

Corrupt images: **fail with a clear error**. timm's ``ImageDataset`` silently substitutes the next sample
when one cannot be decoded, which changes what a run trains on and makes counts wrong; here a file that
cannot be decoded raises :class:`DataError` naming it, the run stops (a checkpoint lets it resume after
the file is fixed or removed). ``check_images`` finds every bad file of a tree up front.

Augmentation is a pure function of ``(seed, epoch, sample index)``: each sample's transform runs under
its own seeded RNG (see :class:`StrictImageDataset`). A run therefore sees the same images whatever the
number of loader workers, processes or interruptions, which is what exact ``--resume`` needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.utils.data
from PIL import Image
from timm.data import (
    ImageNetInfo,
    create_transform,
    infer_imagenet_subset,
    resolve_input_data_config,
    str_to_interp_mode,
)
from timm.data.readers import create_reader
from timm.models import FeatureInfo
from timm.utils import natural_key

from .errors import DataError
from .images import IMAGE_EXTENSIONS, no_images_message, read_image

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
EMBEDDED_DATASET = "fashion_mnist_subset"
_TRAIN_NAMES = ("train", "training")
_EVAL_NAMES = ("val", "validation", "valid", "eval", "evaluation", "test")


def embedded_dataset_path() -> Path:
    """The embedded Fashion-MNIST subset (10 classes, 2000 train + 500 val grey 28x28 PNGs, MIT)."""
    path = Path(__file__).resolve().parent / "data" / EMBEDDED_DATASET
    if not (path / "train").is_dir():
        raise DataError(f"the embedded dataset is missing from this installation ({path})")
    return path


def resolve_data_root(spec: PathLike) -> Path:
    """Accept a directory, or the names ``fashion-mnist`` / ``embedded`` for the embedded subset."""
    if str(spec).lower() in ("embedded", "fashion-mnist", "fashion_mnist", EMBEDDED_DATASET):
        return embedded_dataset_path()
    return Path(spec)


def _require_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is a file: the data is a folder of class folders (or a root with train/ and val/)")
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")


def split_folder(root: PathLike, split: str) -> Path:
    """The folder of ``split`` ('train' or 'val') under ``root``; ``root`` itself if it has class folders only."""
    root = Path(root)
    _require_folder(root)
    names = _TRAIN_NAMES if split in _TRAIN_NAMES else _EVAL_NAMES
    for name in (split, *names):
        if (root / name).is_dir():
            return root / name
    if any((root / n).is_dir() for n in _TRAIN_NAMES + _EVAL_NAMES):
        raise DataError(f"{root} has no '{split}' folder")
    return root


def folder_classes(folder: PathLike) -> List[str]:
    """Class folder names in timm's natural order (the order timm's ImageFolder reader assigns indices).

    Raises DataError when ``folder`` is missing or has no class folders.
    """
    folder = Path(folder)
    _require_folder(folder)
    names = sorted((p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)
    if not names:
        raise DataError(f"{folder} is empty: expected one sub-folder of images per class")
    return names


class StrictImageDataset(torch.utils.data.Dataset):
    """timm's folder reader with the corrupt-image policy above and per-sample seeded augmentation."""

    def __init__(
        self,
        folder: PathLike,
        *,
        class_map: Optional[Mapping[str, int]] = None,
        transform: Optional[Any] = None,
        seed: Optional[int] = None,
    ) -> None:
        self.folder = Path(folder)
        try:  # input_key: the extensions timm's folder reader takes (stvit_core.images, not timm's default three)
            self.reader = create_reader("", root=str(self.folder), class_map=dict(class_map) if class_map else "",
                                        input_key=";".join(IMAGE_EXTENSIONS))
        except RuntimeError:  # timm: "Found 0 images in subfolders of ..."
            raise DataError(no_images_message(self.folder)) from None
        if len(self.reader) == 0:
            raise DataError(no_images_message(self.folder))
        self.class_to_idx: Dict[str, int] = dict(self.reader.class_to_idx)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def targets(self) -> List[int]:
        return [t for _, t in self.reader.samples]

    def __len__(self) -> int:
        return len(self.reader)

    def filename(self, index: int) -> str:
        return self.reader.filename(index, absolute=True)

    def load(self, index: int) -> Tuple[Image.Image, int]:
        path, target = self.reader.samples[index]
        return read_image(path), target

    def __getitem__(self, index: int):
        img, target = self.load(index)
        if self.transform is None:
            return img, target
        if self.seed is None:
            return self.transform(img), target
        with _seeded_rng(_sample_seed(self.seed, self.epoch, index)):
            return self.transform(img), target


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under seeded python/numpy/torch-CPU RNGs and restore the caller's states afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()  # fork_rng covers torch only
    with torch.random.fork_rng(devices=[]):  # CPU only: leave CUDA's dropout RNG alone
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def check_images(folder: PathLike) -> List[str]:
    """Decode every image under ``folder``; return the paths that fail (empty list: all good)."""
    dataset = StrictImageDataset(folder)
    bad = []
    for i in range(len(dataset)):
        try:
            dataset.load(i)
        except DataError:
            bad.append(dataset.filename(i))
    return bad


def model_data_config(model: nn.Module, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The model's own preprocessing (input size, mean/std, interpolation, crop) from its pretrained_cfg.

    Uses the model's current input size (a DeiT built with ``img_size=32`` reports 32, not its default 224).
    """
    return dict(resolve_input_data_config(model, args={k: v for k, v in (overrides or {}).items() if v is not None}))


_SIZE_KEYS = ("input_size", "test_input_size", "min_input_size")
_CROP_MODES = ("center", "squash", "border")  # what timm's create_transform takes


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _is_size(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def preprocessing_problem(config: Mapping[str, Any], *, channels: Optional[int] = None,
                          prefix: str = "") -> Optional[str]:
    """What is wrong with the preprocessing fields of a stored data config (a model's ``pretrained_cfg``, an ONNX
    file's metadata), as ``FIELD is VALUE, not ...``; None when nothing is. Absent fields are not checked.

    Checked before timm's ``create_transform`` meets them, where a wrong type or length is a traceback or,
    worse, a silently different normalisation. ``channels``: the model's input channels (default: those of
    ``input_size``), which ``mean`` and ``std`` must match; ``prefix`` goes before each field's name.
    """
    for key in _SIZE_KEYS:
        value = config.get(key)
        if value is not None and not _is_size(value):
            return f"{prefix}{key} is {_shown(value)}, not a size [channels, height, width] of positive integers"
    if channels is None and config.get("input_size") is not None:
        channels = config["input_size"][0]
    for key in ("mean", "std"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value) \
                or (channels is not None and len(value) != channels):
            count = f"{channels} numbers" if channels is not None else "a list of numbers"
            return f"{prefix}{key} is {_shown(value)}, not {count} (one per input channel)"
        if key == "std" and not all(v > 0 for v in value):
            return f"{prefix}{key} is {_shown(value)}: each must be positive"
    crop_pct = config.get("crop_pct")
    if crop_pct is not None and not (_is_number(crop_pct) and crop_pct > 0):
        return f"{prefix}crop_pct is {_shown(crop_pct)}, not a positive number"
    crop_mode = config.get("crop_mode")
    if crop_mode is not None and crop_mode not in _CROP_MODES:
        return f"{prefix}crop_mode is {_shown(crop_mode)}, not one of {', '.join(_CROP_MODES)}"
    interpolation = config.get("interpolation")
    if interpolation is not None:
        try:
            str_to_interp_mode(interpolation)
        except (KeyError, TypeError):
            return f"{prefix}interpolation is {_shown(interpolation)}, not one of timm's (bicubic, bilinear...)"
    return None


def label_names_problem(names: Any, num_classes: Optional[int], *, field: str = "label_names") -> Optional[str]:
    """What is wrong with stored class names (a list of distinct strings, one per output, or timm's ``{index:
    name}`` mapping when there are gaps); None when nothing is. ``num_classes``: the outputs (None: unknown)."""
    if isinstance(names, Mapping):
        try:
            indices = [int(k) for k in names]
        except (TypeError, ValueError):
            return f"{field} maps {_shown(next(iter(names)))}, not a class index"
        values = list(names.values())
        if num_classes is not None and any(not 0 <= i < num_classes for i in indices):
            return f"{field} names a class index outside the model's {num_classes} outputs"
    elif isinstance(names, (list, tuple)):
        values = list(names)
        if num_classes is not None and len(values) != num_classes:
            return f"{field} has {len(values)} names but the model has {num_classes} outputs"
    else:
        return f"{field} is {_shown(names)}, not a list of class names"
    if not all(isinstance(v, str) for v in values):
        return f"{field} holds {_shown(next(v for v in values if not isinstance(v, str)))}, not a class name"
    if len(set(values)) != len(values):
        duplicate = next(v for v in values if values.count(v) > 1)
        return f"{field} names {duplicate!r} twice"
    return None


def build_transform(data_config: Mapping[str, Any], *, training: bool, auto_augment: Optional[str] = None,
                    re_prob: float = 0.0, scale: Tuple[float, float] = (0.08, 1.0), hflip: float = 0.5):
    """timm's train (RandomResizedCrop, flip, RandAugment, random erasing) or eval (resize + crop) transform.

    Images are read as RGB (:func:`stvit_core.images.read_image`): a model that takes another number of input
    channels cannot run on them, which is said here, before any work, rather than as a shape error mid-run.
    """
    channels = data_config["input_size"][0]
    if channels != 3:
        raise DataError(f"the model takes {channels}-channel images (in_chans={channels}), but images are read as "
                        "RGB, 3 channels: build it with in_chans=3 (the default)")
    common = dict(
        input_size=data_config["input_size"],
        interpolation=data_config.get("interpolation", "bicubic"),
        mean=data_config["mean"],
        std=data_config["std"],
    )
    if training:
        return create_transform(is_training=True, auto_augment=auto_augment or None, re_prob=re_prob,
                                scale=tuple(scale), hflip=hflip, **common)
    return create_transform(is_training=False, crop_pct=data_config.get("crop_pct"),
                            crop_mode=data_config.get("crop_mode", "center"), **common)


def check_num_classes(dataset: StrictImageDataset, num_classes: int) -> None:
    """Training: the data's classes must be exactly the head's outputs (else say how to reset the head)."""
    n = len(dataset.class_to_idx)
    if num_classes <= 0:
        raise DataError(f"the model has no classification head (num_classes=0); pass --num-classes {n}")
    if n != num_classes:
        raise DataError(
            f"{dataset.folder} has {n} classes but the model's head has {num_classes} outputs; "
            f"pass --num-classes {n} to reset the head"
        )


def imagenet_class_map() -> Dict[str, int]:
    """ImageNet-1k synset -> class index, in timm's ``ImageNetInfo`` order (the order of every timm head)."""
    return {synset: i for i, synset in enumerate(ImageNetInfo("imagenet-1k").label_names())}


def imagenet_dataset(folder: PathLike, transform: Any) -> StrictImageDataset:
    """ImageNet-1k validation images in synset folders (``n01440764/...``), indexed in timm's order."""
    class_map = imagenet_class_map()
    unknown = [n for n in folder_classes(folder) if n not in class_map]
    if unknown:
        raise DataError(
            f"{folder}: {len(unknown)} folder(s) are not ImageNet-1k synsets (e.g. {unknown[0]!r}); "
            "use 'stvit eval folder' for other datasets"
        )
    return StrictImageDataset(folder, class_map=class_map, transform=transform)


def label_map_from_model(model: nn.Module) -> Optional[Dict[str, int]]:
    """The model's own class names (``pretrained_cfg['label_names']``) as name -> index, if it has them."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if isinstance(names, Mapping):
        return {str(v): int(k) for k, v in names.items()}
    if isinstance(names, Sequence) and not isinstance(names, str) and names:
        return {str(n): i for i, n in enumerate(names)}
    return None


def is_features_model(model: nn.Module) -> bool:
    """A timm ``features_only`` model (it returns feature maps, not class scores)."""
    # timm's features_only wrappers carry a FeatureInfo (public); classification models a plain list of dicts
    return isinstance(getattr(model, "feature_info", None), FeatureInfo)


def class_names(model: nn.Module) -> Optional[List[str]]:
    """The model's class names: its ``label_names`` (models from ``stvit finetune`` record them), else the
    ImageNet descriptions timm infers from a 1000/11k/21k-class head, else None (also for a features model)."""
    if is_features_model(model):
        return None
    num_classes = getattr(model, "num_classes", None)
    labels = label_map_from_model(model)
    if labels:
        names = sorted(labels, key=labels.get)
        return names[:num_classes] if num_classes else names
    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return [info.index_to_description(i) for i in range(info.num_classes())]


def folder_dataset(folder: PathLike, transform: Any, class_map: Optional[Mapping[str, int]] = None,
                   seed: Optional[int] = None) -> StrictImageDataset:
    """An ImageFolder dataset; with ``class_map`` (name -> index) only the class folders it names are read."""
    folder_classes(folder)  # a missing or empty folder: a clear error before timm's reader sees it
    return StrictImageDataset(folder, class_map=class_map, transform=transform, seed=seed)


def reraise_loader_error(e: BaseException) -> None:
    """DataLoader workers re-raise errors with the worker's traceback in the message; keep one line."""
    if isinstance(e, DataError):
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        last = lines[-1] if lines else "data error"
        prefix = "stvit_core.errors.DataError: "
        raise DataError(last[len(prefix):] if last.startswith(prefix) else last) from None
