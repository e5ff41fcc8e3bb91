"""Top-k evaluation of a model on ImageNet-1k validation or any labelled image folder.

Each model is evaluated with its own preprocessing (input size, mean/std, interpolation, crop) from its
``pretrained_cfg``, resolved by timm. ImageNet class indices follow timm's ``ImageNetInfo`` synset order
(the order every timm ImageNet head uses); a generic folder uses the model's ``label_names`` when it has
them (a model exported by ``stvit finetune`` does), else the sorted folder names.

Works under torchrun too: each rank evaluates a disjoint shard and the counts are summed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.nn as nn

from . import data as stdata
from .checkpoint import atomic_write_bytes, load_model
from .errors import InvalidArgumentError
from .flops import count_flops
from .train import DistInfo, eval_loader, evaluate, setup_distributed

RESULT_FIELDS = ["model", "top1", "top5", "loss", "images", "img_per_sec", "params", "gflops", "input_size",
                 "batch_size", "device", "data"]


def count_gflops(model: nn.Module, input_size) -> Optional[float]:
    """GFLOPs per image in the paper's convention; None where the model cannot be counted (informative only)."""
    try:
        return float(count_flops(model, tuple(input_size)))
    except Exception:  # never fail an evaluation over a FLOPs count
        return None


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
    accepted too). Otherwise it is an ImageFolder of class folders (or a root with ``val/``).
    """
    if batch_size < 1:
        raise InvalidArgumentError("batch size must be at least 1")
    dist: DistInfo = setup_distributed(device)
    spec = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = load_model(model)
    model = model.to(dist.device).eval()
    data_config = stdata.model_data_config(model)
    transform = stdata.build_transform(data_config, training=False)
    folder = stdata.split_folder(stdata.resolve_data_root(data_dir), "val")
    if imagenet:
        dataset = stdata.imagenet_dataset(folder, transform)
    else:
        dataset = stdata.folder_dataset(folder, transform, class_names=stdata.label_map_from_model(model))
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None:
        stdata.check_num_classes(dataset, num_classes)
    metrics = evaluate(model, eval_loader(dataset, batch_size, workers, dist), dist, amp=amp)
    return {
        "model": spec or type(model).__name__,
        "top1": round(metrics["top1"], 4),
        "top5": round(metrics["top5"], 4),
        "loss": round(metrics["loss"], 6),
        "images": metrics["images"],
        "img_per_sec": round(metrics["img_per_sec"], 2),
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": _round(count_gflops(model, data_config["input_size"])),
        "input_size": list(data_config["input_size"]),
        "batch_size": batch_size,
        "device": str(dist.device),
        "data": str(folder),
    }


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


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
    atomic_write_bytes(path, payload)
    return path
