"""Top-k evaluation: the validation loop shared by fine-tuning and ``stvit eval``, and ``evaluate_model``.

Each model is evaluated with its own preprocessing (input size, mean/std, interpolation, crop) from its
``pretrained_cfg``, resolved by timm. ImageNet class indices follow timm's ``ImageNetInfo`` synset order
(the order every timm ImageNet head uses); a generic folder uses the model's ``label_names`` when it has
them (a model exported by ``stvit finetune`` does), else the sorted folder names, which must then be as
many as the head's outputs.

Works under torchrun too: each rank evaluates a disjoint shard and the counts are summed.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
from timm.utils import AverageMeter, accuracy
from tqdm import tqdm

from . import data as stdata
from .device import autocast
from .distributed import DistInfo, all_reduce_sum, setup_distributed
from .errors import DataError, InvalidArgumentError, StvitError
from .files import atomic_write_bytes
from .flops import count_flops
from .loading import load_model

__all__ = ["RESULT_FIELDS", "eval_loader", "evaluate_model", "folder_class_map", "top5_applies", "validate",
           "write_results_file"]

RESULT_FIELDS = ["model", "top1", "top5", "loss", "images", "img_per_sec", "params", "gflops", "input_size",
                 "batch_size", "device", "data"]
IMAGENET_CLASSES = 1000


def eval_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
                dist: DistInfo) -> torch.utils.data.DataLoader:
    """This process's shard of ``dataset``: every ``world_size``-th image from its rank, in order.

    Deliberately not torch's DistributedSampler or timm's OrderedDistributedSampler: they repeat images to
    even out the shards, and then the summed counts would not be over exactly the dataset.
    """
    shard = torch.utils.data.Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    return torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=dist.device.type == "cuda")


@torch.no_grad()
def validate(model: nn.Module, loader: torch.utils.data.DataLoader, dist: DistInfo, *, amp: Optional[str] = None,
             progress: bool = False) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy and image count, over every process's shard.

    ``top5`` is None for a model of five classes or fewer, where every image's class is among its top five:
    the figure would be 100 whatever the model, so it is reported as not applicable.
    """

    model.eval()
    outputs = getattr(model, "num_classes", None)
    loss_m, top1_m, top5_m = AverageMeter(), AverageMeter(), AverageMeter()
    start = time.perf_counter()
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
            images = images.to(dist.device, non_blocking=True)
            targets = targets.to(dist.device, non_blocking=True)
            with autocast(dist.device, amp):
                logits = model(images)
            logits = logits.float()
            outputs = logits.shape[-1]
            acc1, acc5 = accuracy(logits, targets, topk=(1, 5))
            loss_m.update(F.cross_entropy(logits, targets).item(), targets.size(0))
            top1_m.update(acc1.item(), targets.size(0))
            top5_m.update(acc5.item(), targets.size(0))
    except DataError as e:
        stdata.reraise_loader_error(e)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    loss_sum, top1_sum, top5_sum, count = all_reduce_sum([loss_m.sum, top1_m.sum, top5_m.sum, loss_m.count], dist)
    if count == 0:
        raise DataError("no images to evaluate")
    return {
        "top1": round(top1_sum / count, 4),  # accuracy() is float32: drop its noise
        "top5": round(top5_sum / count, 4) if top5_applies(outputs) else None,
        "loss": loss_sum / count,
        "images": int(count),
        "seconds": seconds,
        "img_per_sec": count / seconds if seconds > 0 else float("nan"),
    }


def top5_applies(num_classes: Optional[int]) -> bool:
    """Top-5 accuracy says something only with more than five classes (else it is 100 for any model)."""
    return num_classes is None or num_classes > 5


def _preview(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(list(names)[:n]) + (", ..." if len(names) > n else "")


def folder_class_map(folder: Path, model: nn.Module) -> Tuple[Dict[str, int], List[str]]:
    """Which head output each class folder of ``folder`` is, and warnings about folders left out.

    With the model's ``label_names``: the folders named among them (the others are left out, with a
    warning; none at all is an error). Without: the folders in natural order, which must be exactly as many
    as the head's outputs, since nothing else says which output is which class.
    """
    names = stdata.folder_classes(folder)
    num_classes = getattr(model, "num_classes", None)
    labels = stdata.label_map_from_model(model)
    if labels is None:
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"{folder} has {len(names)} class folders but the model has {num_classes} outputs and "
                            "no label names to match them by; evaluate a model trained on these classes "
                            "('stvit finetune' records their names)")
        return {name: i for i, name in enumerate(names)}, []
    if num_classes is not None:
        labels = {name: i for name, i in labels.items() if i < num_classes}
    covered = {name: labels[name] for name in names if name in labels}
    if not covered:
        raise DataError(f"none of the {len(names)} class folders of {folder} ({_preview(names)}) is among the "
                        f"model's {len(labels)} label names ({_preview(sorted(labels, key=labels.get))})")
    missing = [name for name in names if name not in covered]
    if not missing:
        return covered, []
    return covered, [f"{len(missing)} of the {len(names)} class folders of {folder} are not among the model's "
                     f"label names ({_preview(missing)}): their images are left out of the evaluation"]


def _check_imagenet_head(model: nn.Module) -> None:
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != IMAGENET_CLASSES:
        raise DataError(f"the model has {num_classes} outputs, not ImageNet-1k's {IMAGENET_CLASSES}: 'stvit eval "
                        "imagenet' reads them as the ImageNet-1k classes; evaluate a model trained on other "
                        "classes on a folder of those classes with 'stvit eval folder'")


def evaluate_model(
    model: Union[str, nn.Module],
    data_dir: str,
    *,
    imagenet: bool,
    batch_size: int = 64,
    device: Optional[str] = None,
    workers: int = 2,
    amp: Optional[str] = None,
) -> Dict[str, Any]:
    """Evaluate ``model`` (a spec for :func:`stvit_core.load_model`, or a module) on ``data_dir``.

    ``imagenet``: ``data_dir`` holds ImageNet-1k synset folders (``n01440764/...``; a root with ``val/`` is
    accepted too). Otherwise it is an ImageFolder of class folders (or a root with ``val/``). The result's
    ``warnings`` lists what the caller should show the user (class folders left out).
    """

    dist = setup_distributed(device)  # an unknown or missing device fails before any work
    if batch_size < 1:
        raise InvalidArgumentError("batch size must be at least 1")
    spec = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = load_model(model)
    model = model.to(dist.device).eval()
    data_config = stdata.model_data_config(model)
    transform = stdata.build_transform(data_config, training=False)
    folder = stdata.split_folder(stdata.resolve_data_root(data_dir), "val")
    warnings: List[str] = []
    if imagenet:
        _check_imagenet_head(model)
        dataset = stdata.imagenet_dataset(folder, transform)
    else:
        class_map, warnings = folder_class_map(folder, model)
        dataset = stdata.folder_dataset(folder, transform, class_map=class_map)
    metrics = validate(model, eval_loader(dataset, batch_size, workers, dist), dist, amp=amp)
    try:
        gflops: Optional[float] = round(float(count_flops(model, tuple(data_config["input_size"]))), 4)
    except Exception:  # informative only: never fail an evaluation over a FLOPs count
        gflops = None
    return {
        "model": spec or type(model).__name__,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": round(metrics["loss"], 6),
        "images": metrics["images"],
        "img_per_sec": round(metrics["img_per_sec"], 2),
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": gflops,
        "input_size": list(data_config["input_size"]),
        "batch_size": batch_size,
        "device": str(dist.device),
        "data": str(folder),
        "warnings": warnings,
    }


def write_results_file(path: Union[str, Path], result: Dict[str, Any]) -> Path:
    """Write one result as CSV (header + row, like timm's validate.py) or JSON, chosen by the suffix."""

    path = Path(path)
    if path.suffix == ".json":
        payload = json.dumps(result, indent=2).encode()
    elif path.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in result.items()})
        payload = buf.getvalue().encode()
    else:
        raise InvalidArgumentError(f"results file must end in .csv or .json: {path}")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"folder of the results file does not exist: {path.parent}")
    try:
        atomic_write_bytes(path, payload)
    except OSError as e:
        raise StvitError(f"cannot write results file {path}: {e.strerror or e}") from None
    return path
