"""Deployment: export to ONNX or ``torch.export`` (``.pt2``), and the check of the written file.

The model comes from :func:`stvit_core.load_model` (:func:`features_model` gives an STViT-R model's feature
maps instead of its class scores). ``export_model`` exports with ``torch.export.export`` (dynamic or fixed
batch), writes ``.pt2`` (``torch.export.save``) or ONNX (``torch.onnx.export(program, dynamo=True)``), then
runs the written file (``torch.export.load`` / onnxruntime) on the inputs PyTorch ran and keeps it only if the
largest absolute difference is within the tolerance. The file is written under a temporary name and renamed
into place when it has passed.

The ONNX file carries the model's preprocessing and class names as ``metadata_props`` (:func:`onnx_metadata`),
so a serving stack needs nothing else (:mod:`stvit_core.onnx_runtime` reads them back).

onnx, onnxscript and onnxruntime are the optional extra ``stvit[export]``; without them the ONNX paths raise
:class:`~stvit_core.errors.MissingExtraError` naming the extra (``.pt2`` export needs nothing beyond torch).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.export import Dim

from .checkpoint import load_saved_model, save_model
from .data import class_names, is_features_model, model_data_config
from .errors import InvalidArgumentError, StvitError, first_line, require_extra
from .files import check_output_path, rename_into_place, temporary_file
from .loading import architecture_of
from .onnx_runtime import ONNX_MODULES, onnx_session
from .version import __version__

__all__ = ["EXPORT_FORMATS", "TOLERANCE", "ExportCheckError", "default_onnx_opset", "export_model", "features_model",
           "max_abs_diff", "onnx_metadata", "to_onnx", "trace_model"]

EXPORT_FORMATS = ("onnx", "pt2")
TOLERANCE = 1e-4  # fp32: what exported graphs reorder in reductions stays orders of magnitude below this
INPUT_NAME = "image"


class ExportCheckError(StvitError):
    """The exported file does not reproduce PyTorch's outputs within the tolerance."""


# ---------------------------------------------------------------------------------------------------------------
# The model to deploy


def features_model(model: nn.Module) -> nn.Module:
    """timm's ``features_only`` model of an STViT-R ``model`` (its full-resolution maps), built by timm's own
    ``features_only`` path from the saved model, weights included."""
    architecture = architecture_of(model)
    if not architecture.startswith("stvit_r_"):
        raise InvalidArgumentError(
            f"{{features_only}} needs an STViT-R model (stvit_r_*): {architecture} ends on its semantic tokens and "
            "has no full-resolution feature maps (convert with {recovery=}, or a Swin model)", features_only=True,
            recovery=True)
    with tempfile.TemporaryDirectory(prefix="stvit-features-") as tmp:
        save_model(model, Path(tmp) / "model")
        return load_saved_model(Path(tmp) / "model", features_only=True).eval()


# ---------------------------------------------------------------------------------------------------------------
# Metadata: the preprocessing and class names a serving stack needs


def onnx_metadata(model: nn.Module) -> Dict[str, str]:
    """``metadata_props`` of the model's ONNX file: preprocessing (timm's data config), class names, provenance."""
    config = model_data_config(model)
    meta: Dict[str, str] = {
        "model_name": architecture_of(model),
        "stvit_version": __version__,
        "output": "features" if is_features_model(model) else "logits",
        "input_size": json.dumps([int(v) for v in config["input_size"]]),
        "mean": json.dumps([float(v) for v in config["mean"]]),
        "std": json.dumps([float(v) for v in config["std"]]),
        "crop_pct": json.dumps(float(config.get("crop_pct") or 1.0)),
        "crop_mode": str(config.get("crop_mode") or "center"),
        "interpolation": str(config.get("interpolation") or "bicubic"),
    }
    names = class_names(model)
    if names is not None:
        meta["label_names"] = json.dumps(names)
    return meta


def _outputs(out: Any) -> List[torch.Tensor]:
    return [torch.as_tensor(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def max_abs_diff(outputs: Any, references: Any) -> float:
    """Largest absolute difference over every output (NaN where shapes or counts differ)."""
    outputs, references = _outputs(outputs), _outputs(references)
    if len(outputs) != len(references) or any(o.shape != r.shape for o, r in zip(outputs, references)):
        return float("nan")
    return max(float((o.float() - r.float()).abs().max()) for o, r in zip(outputs, references))


# ---------------------------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # the ONNX exporter prints progress on stdout and warns (warnings and logging, a failed opset conversion with
    # its traceback) about its own internals; library code never prints, and what matters is checked after
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    disabled = [logger.disabled for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.disabled = True
        try:
            yield
        finally:
            for logger, was in zip(loggers, disabled):
                logger.disabled = was


_EXPORTER_LOGGERS = ("onnxscript", "onnxscript.version_converter", "onnx_ir", "torch.onnx",
                     "torch.onnx._internal.exporter._compat", "torch.onnx._internal.exporter._core")


def _check_inputs(model: nn.Module, batch_sizes: Sequence[int]) -> Dict[int, torch.Tensor]:
    size = tuple(model_data_config(model)["input_size"])
    return {b: torch.randn(b, *size, generator=torch.Generator().manual_seed(1000 + b)) for b in batch_sizes}


def trace_model(model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool) -> Any:
    """``torch.export.export`` of ``model`` at ``example``, its batch dimension dynamic or fixed."""
    # the example batch must not be 1 for a dynamic batch: torch.export specialises sizes 0 and 1
    dynamic_shapes = ({0: Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with _quiet():
            return torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise StvitError(f"cannot export {architecture_of(model)} with torch.export: {first_line(e)}") from None


def default_onnx_opset() -> Optional[int]:
    """The opset torch's exporter writes when none is asked for (it builds opset 18 and converts to this one);
    None when this torch does not say."""
    # torch.onnx._constants is private: read it defensively, it may move
    default = getattr(getattr(torch.onnx, "_constants", None), "ONNX_DEFAULT_OPSET", None)
    return default if isinstance(default, int) else None


def to_onnx(program: Any, example: torch.Tensor, *, output_names: Sequence[str], opset: Optional[int] = None,
            metadata: Optional[Mapping[str, str]] = None, optimize: bool = True) -> Any:
    """The ``torch.onnx.ONNXProgram`` of an exported program (the dynamo exporter), ``metadata`` in its
    ``metadata_props``."""
    require_extra("export", ONNX_MODULES, "ONNX export")
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, optimize=optimize, verbose=False,
                                             opset_version=opset, input_names=[INPUT_NAME],
                                             output_names=list(output_names))
    except Exception as e:
        raise StvitError(f"cannot convert the exported program to ONNX{f' opset {opset}' if opset else ''}: "
                         f"{first_line(e)}") from None
    written = onnx_program.model.opset_imports.get("")
    if opset is not None and written != opset:  # the exporter logs a failed conversion and keeps its own opset
        default = default_onnx_opset()
        without = f" (without an opset it writes {default})" if default else ""
        raise InvalidArgumentError(f"cannot write ONNX opset {opset}: torch's exporter builds opset {written} and "
                                   f"could not convert it to {opset}{without}")
    onnx_program.model.metadata_props.update(dict(metadata or {}))
    return onnx_program


def _output_names(model: nn.Module, example: torch.Tensor) -> List[str]:
    with torch.no_grad():
        out = _outputs(model(example[:1]))
    return ["logits"] if len(out) == 1 and not is_features_model(model) else [f"features_{i}" for i in range(len(out))]


def _run_file(path: Path, format: str, inputs: Mapping[int, torch.Tensor]) -> Dict[int, List[torch.Tensor]]:
    """Run the written file (not the in-memory program) on each input."""
    if format == "pt2":
        try:
            module = torch.export.load(str(path)).module()
        except Exception as e:
            raise StvitError(f"cannot load the written file with torch.export.load: {first_line(e)}") from None
        with torch.no_grad():
            return {b: _outputs(module(x)) for b, x in inputs.items()}
    session = onnx_session(path, name="the exported file")  # not the temporary name the user never sees
    return {b: _outputs(session.run(None, {INPUT_NAME: x.numpy()})) for b, x in inputs.items()}


def export_model(
    model: nn.Module,
    output: Union[str, os.PathLike],
    *,
    format: str = "onnx",
    batch_size: Optional[int] = None,
    opset: Optional[int] = None,
    force: bool = False,
    tolerance: float = TOLERANCE,
    optimize: bool = True,
) -> Dict[str, Any]:
    """Export ``model`` to ``output`` (``format`` ``onnx`` or ``pt2``) and check the written file.

    ``batch_size`` None: a dynamic batch dimension, checked at batch 1 and 3; else fixed at ``batch_size`` and
    checked there. The check runs the file (onnxruntime / ``torch.export.load``) on the random inputs PyTorch
    runs; a largest absolute difference above ``tolerance`` raises :class:`ExportCheckError` and nothing is
    written. ``opset``: the ONNX opset (torch's default otherwise). ``optimize``: onnxscript's graph optimiser
    (constant folding, redundant casts and reshapes removed). Returns what the ``--json`` output shows.
    """
    if format not in EXPORT_FORMATS:
        raise InvalidArgumentError(f"unknown format {format!r}: expected {' or '.join(EXPORT_FORMATS)}")
    if opset is not None and format != "onnx":
        raise InvalidArgumentError("{opset} applies to ONNX only, not {format=}", opset=opset, format=format)
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"{{batch_size}} must be at least 1, got {batch_size}", batch_size=batch_size)
    if format == "onnx":
        require_extra("export", ONNX_MODULES, "ONNX export")
    output = check_output_path(output, force=force)
    model = model.eval()
    dynamic = batch_size is None
    checks = (1, 3) if dynamic else (batch_size,)
    example_batch = 2 if dynamic else batch_size
    inputs = _check_inputs(model, sorted({example_batch, *checks}))
    with torch.no_grad():
        expected = {b: _outputs(model(inputs[b])) for b in checks}
    names = _output_names(model, inputs[example_batch])
    program = trace_model(model, inputs[example_batch], dynamic_batch=dynamic)
    classifier = getattr(model, "model", model)  # timm's feature wrappers keep the model as .model
    result: Dict[str, Any] = {"model": architecture_of(model), "tokens": getattr(classifier, "num_semantic_tokens", None),
                              "tokens_per_window": getattr(classifier, "semantic_tokens_per_window", None),
                              "output": str(output), "format": format,
                              "dynamic_batch": dynamic, "batch_size": batch_size, "opset": None,
                              "input_size": list(inputs[example_batch].shape[1:]), "outputs": names}
    with temporary_file(output, suffix=f".{format}") as tmp:  # torch.export.load wants a name ending in .pt2
        if format == "pt2":
            torch.export.save(program, str(tmp))
            result["checked_with"] = f"torch.export.load (torch {torch.__version__})"
        else:
            metadata = onnx_metadata(model)
            onnx_program = to_onnx(program, inputs[example_batch], output_names=names, opset=opset,
                                   metadata=metadata, optimize=optimize)
            onnx_program.save(str(tmp), external_data=False)
            import onnxruntime

            result.update(opset=onnx_program.model.opset_imports.get(""), metadata=metadata,
                          checked_with=f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)")
        got = _run_file(tmp, format, {b: inputs[b] for b in checks})
        diffs = {b: max_abs_diff(got[b], expected[b]) for b in checks}
        worst_batch = max(diffs, key=lambda b: float("inf") if diffs[b] != diffs[b] else diffs[b])
        if not diffs[worst_batch] <= tolerance:  # NaN fails too
            raise ExportCheckError(f"the exported {format} file differs from PyTorch by {diffs[worst_batch]:.3g} at "
                                   f"batch {worst_batch} (tolerance {tolerance:g}); nothing was written")
        size = tmp.stat().st_size
        rename_into_place(tmp, output, force=force)  # an output another export wrote meanwhile is not replaced
    result.update(checks=[{"batch_size": b, "max_abs_diff": diffs[b]} for b in checks],
                  max_abs_diff=diffs[worst_batch], tolerance=tolerance, size_mb=round(size / 2**20, 2))
    return result
