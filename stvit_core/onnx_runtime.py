"""Running exported ONNX files with onnxruntime: sessions, execution providers, and the preprocessing metadata
that ``stvit export`` stores in each file (read back into the data config timm's ``create_transform`` takes).

onnxruntime is part of the optional extra ``stvit[export]``; without it these functions raise
:class:`~stvit_core.errors.MissingExtraError` naming the extra.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .data import label_names_problem, preprocessing_problem
from .errors import CheckpointError, InvalidArgumentError, first_line, require_extra

__all__ = ["ONNX_MODULES", "onnx_data_config", "onnx_providers", "onnx_session", "read_onnx_metadata"]

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # what the extra stvit[export] installs


def onnx_session(path: Union[str, os.PathLike, bytes], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, *, name: Optional[str] = None) -> Any:
    """An onnxruntime ``InferenceSession`` (CPU unless ``providers`` say otherwise, ``threads`` intra-op threads;
    default: torch's thread count, so that both runtimes are compared on the same threads). ``name``: what
    errors call the file (default: its path)."""
    require_extra("export", ("onnxruntime",), "running an ONNX file")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: onnxruntime warns about initialisers it folds away
    try:
        return onnxruntime.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile classes
        what = name or ("the model" if isinstance(path, bytes) else str(path))
        raise CheckpointError(f"cannot load {what} with onnxruntime: {first_line(e)}") from None


def onnx_providers(device: Optional[str]) -> List[str]:
    """onnxruntime providers for ``--device``: ``cuda``/``cuda:N`` needs the CUDA provider (onnxruntime-gpu);
    auto takes it when onnxruntime has it, else the CPU."""
    require_extra("export", ("onnxruntime",), "running an ONNX file")
    import onnxruntime

    available = onnxruntime.get_available_providers()
    spec = (device or "auto").lower()
    if spec == "cpu":
        return ["CPUExecutionProvider"]
    if spec.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise InvalidArgumentError("{device=}: this onnxruntime has no CUDAExecutionProvider "
                                       "(install onnxruntime-gpu)", device=device)
        index = int(spec.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]  # type: ignore[list-item]
    if spec == "auto":
        return (["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available
                else ["CPUExecutionProvider"])
    raise InvalidArgumentError("{device=}: onnxruntime runs on cpu or cuda", device=device)


def read_onnx_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The ``metadata_props`` of an ONNX file written by :func:`export_model`, JSON values decoded and checked.

    A field that was edited into a wrong type or value (an ``input_size`` that is not a size, ``mean`` not one
    number per channel, ``label_names`` not one name per output...) is one line naming the file and the field.
    """
    require_extra("export", ("onnxruntime",), "reading an ONNX file")
    session = onnx_session(path)
    raw = session.get_modelmeta().custom_metadata_map
    if "mean" not in raw or "input_size" not in raw:
        raise CheckpointError(f"{path} has no stvit preprocessing metadata (export it with 'stvit export')")
    meta: Dict[str, Any] = dict(raw)
    for key in ("input_size", "mean", "std", "crop_pct", "label_names"):
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: metadata {key!r} is not JSON: {meta[key][:80]!r}") from None
    problem = _metadata_problem(meta, session)
    if problem:
        raise CheckpointError(f"{path}: metadata {problem}")
    return meta


def _metadata_problem(meta: Mapping[str, Any], session: Any) -> Optional[str]:
    missing = [key for key in ("std", "crop_pct") if meta.get(key) is None]
    if missing:
        return f"{missing[0]} is missing"
    problem = preprocessing_problem(meta)
    if problem:
        return problem
    if meta.get("output", "logits") not in ("logits", "features"):
        return f"output is {meta['output']!r}, not logits or features"
    if meta.get("label_names") is not None:
        if not isinstance(meta["label_names"], list):  # export writes one name per output, in order
            return f"label_names is {type(meta['label_names']).__name__}, not a list of class names"
        outputs = session.get_outputs()[0].shape
        # a classifier's class count is its output's last dimension (a name if the file left it symbolic)
        num_classes = outputs[-1] if outputs and isinstance(outputs[-1], int) else None
        problem = label_names_problem(meta["label_names"], num_classes)
        if problem:
            return problem
    return None


def onnx_data_config(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The data config (what ``stvit_core.data.build_transform`` / timm's ``create_transform`` take) of an ONNX
    file's metadata: the same values, hence the same transform, as the model it was exported from."""
    return {"input_size": tuple(meta["input_size"]), "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
            "crop_pct": meta["crop_pct"], "crop_mode": meta.get("crop_mode", "center"),
            "interpolation": meta.get("interpolation", "bicubic")}
