"""``stvit predict``: class names and probabilities per image, with the model's own preprocessing.

Two runtimes, one preprocessing: a PyTorch model (from :func:`stvit_core.load_model`) builds its transform from
its ``pretrained_cfg`` (:func:`stvit_core.data.model_data_config`); an exported ``.onnx`` file from the data
config stored in its metadata (:func:`stvit_core.onnx_runtime.onnx_data_config`). Both go
through the same timm ``create_transform`` (:func:`stvit_core.data.build_transform`), so an image becomes the
same input tensor either way.

Images that cannot be read do not stop the others: each is reported in ``errors`` with its reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .data import build_transform, class_names, model_data_config
from .device import resolve_device
from .errors import DataError, InvalidArgumentError
from .images import find_images, read_image
from .loading import load_model
from .onnx_runtime import onnx_data_config, onnx_providers, onnx_session, read_onnx_metadata

__all__ = ["OnnxClassifier", "TorchClassifier", "load_classifier", "predict_images"]

PathLike = Union[str, os.PathLike]


class TorchClassifier:
    """A PyTorch classifier with its own preprocessing."""

    runtime = "torch"

    def __init__(self, model: nn.Module, device: Optional[str] = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.num_classes = int(model.num_classes)
        self.class_names = class_names(model)
        self.data_config = model_data_config(model)
        self.transform = build_transform(self.data_config, training=False)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().softmax(-1).cpu()


class OnnxClassifier:
    """An ONNX file written by ``stvit export``, run with onnxruntime, preprocessing read from its metadata."""

    runtime = "onnxruntime"

    def __init__(self, path: PathLike, device: Optional[str] = None) -> None:
        self.metadata = read_onnx_metadata(path)
        if self.metadata.get("output") == "features":
            raise InvalidArgumentError(f"{path} outputs feature maps (exported with --features): predict needs a "
                                       "classifier")
        self.session = onnx_session(path, providers=onnx_providers(device))
        self.device = self.session.get_providers()[0]
        feed = self.session.get_inputs()[0]
        self.input_name = feed.name
        self.fixed_batch = feed.shape[0] if isinstance(feed.shape[0], int) else None
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        self.class_names = self.metadata.get("label_names")
        self.data_config = onnx_data_config(self.metadata)
        self.transform = build_transform(self.data_config, training=False)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        step = self.fixed_batch or n
        out = []
        for start in range(0, n, step):
            chunk = batch[start:start + step].numpy()
            if self.fixed_batch and chunk.shape[0] < step:  # a file exported at a fixed batch: pad the last one
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - chunk.shape[0], axis=0)])
            logits = self.session.run(None, {self.input_name: chunk})[0]
            out.append(torch.from_numpy(logits[:min(step, n - start)]))
        return torch.cat(out).float().softmax(-1)


Classifier = Union[TorchClassifier, OnnxClassifier]


def load_classifier(spec: str, *, device: Optional[str] = None, **model_kwargs: Any) -> Classifier:
    """An ``.onnx`` file (onnxruntime), or an STViT model :func:`stvit_core.load_model` gives for ``spec``."""
    if spec.lower().endswith(".onnx"):
        given = {k: v for k, v in sorted(model_kwargs.items()) if v not in (None, False)
                 and not (k == "pretrained" and v is True)}
        if given:
            fields = ", ".join(f"{{{name}=}}" for name in given)
            raise InvalidArgumentError(f"{fields} cannot apply to an ONNX file ({spec})", **given)
        if not Path(spec).is_file():
            raise DataError(f"cannot read {spec}: No such file")
        return OnnxClassifier(spec, device=device)
    return TorchClassifier(load_model(spec, stvit_only=True, **model_kwargs).eval(), device=device)


def _top_k(probabilities: torch.Tensor, k: int, names: Optional[Sequence[str]]) -> List[List[Dict[str, Any]]]:
    values, indices = probabilities.topk(k, dim=-1)
    return [[{"index": int(i), "label": names[int(i)] if names else str(int(i)), "probability": float(p)}
             for p, i in zip(row_p, row_i)] for row_p, row_i in zip(values, indices)]


def predict_images(classifier: Classifier, paths: Sequence[PathLike], *, top_k: Optional[int] = None,
                   batch_size: int = 32) -> Dict[str, Any]:
    """Top-``top_k`` classes (default 5, or all when fewer) for each image under ``paths``.

    Returns ``{runtime, device, top_k, predictions: [{image, top_k: [{index, label, probability}]}],
    errors: [{image, error}]}``; unreadable files and missing paths land in ``errors``, the rest is predicted.
    """
    if top_k is not None and not 1 <= top_k <= classifier.num_classes:
        raise InvalidArgumentError(f"{{top_k=}} must be between 1 and the model's {classifier.num_classes} classes",
                                   top_k=top_k)
    if batch_size < 1:
        raise InvalidArgumentError(f"{{batch_size}} must be at least 1, got {batch_size}", batch_size=batch_size)
    k = top_k or min(5, classifier.num_classes)
    images, errors = find_images(paths)
    predictions: List[Dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        tensors, names = [], []
        for path in images[start:start + batch_size]:
            try:
                tensors.append(classifier.transform(read_image(path)))
                names.append(str(path))
            except DataError as e:
                errors.append({"image": str(path), "error": str(e)})
        if tensors:
            rows = _top_k(classifier.probabilities(torch.stack(tensors)), k, classifier.class_names)
            predictions.extend({"image": name, "top_k": row} for name, row in zip(names, rows))
    return {"runtime": classifier.runtime, "device": str(classifier.device), "top_k": k,
            "images": len(predictions), "predictions": predictions, "errors": errors}

