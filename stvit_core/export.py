"""Deployment: the model to deploy, its export to ONNX or ``torch.export`` (``.pt2``), and the check of the file.

``load_stvit_model`` resolves what every deployment command takes (a model directory, ``hf-hub:org/name``, an
``stvit_*`` name, or a timm DeiT/ViT/Swin name converted on the fly when a token count is given) and refuses
models that are not STViT models. ``export_model`` exports with ``torch.export.export`` (dynamic or fixed
batch), writes ``.pt2`` (``torch.export.save``) or ONNX (``torch.onnx.export(program, dynamo=True)``), then
runs the written file (``torch.export.load`` / onnxruntime) on the inputs PyTorch ran and keeps it only if the
largest absolute difference is within the tolerance. The file is written under a temporary name and renamed
into place when it has passed.

The ONNX file carries the model's preprocessing and class names as ``metadata_props`` (:func:`onnx_metadata`),
so a serving stack needs nothing else: :func:`read_onnx_metadata` reads them back and
:func:`onnx_data_config` turns them into the data config timm's ``create_transform`` takes.

onnx, onnxscript and onnxruntime are the optional extra ``stvit[export]``; without them the ONNX paths raise
:class:`MissingExtraError` naming the extra (``.pt2`` export needs nothing beyond torch).
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

from .checkpoint import file_in_the_way, names_a_saved_model
from .errors import CheckpointError, InvalidArgumentError, OutputExistsError, StvitError, first_line

__all__ = [
    "EXPORT_FORMATS",
    "TOLERANCE",
    "ExportCheckError",
    "MissingExtraError",
    "check_output_path",
    "default_onnx_opset",
    "refuse_folder_name",
    "export_model",
    "is_features_model",
    "load_stvit_model",
    "max_abs_diff",
    "onnx_data_config",
    "onnx_metadata",
    "onnx_providers",
    "onnx_session",
    "read_onnx_metadata",
    "require_extra",
    "to_onnx",
    "trace_model",
]

EXPORT_FORMATS = ("onnx", "pt2")
TOLERANCE = 1e-4  # fp32: what exported graphs reorder in reductions stays orders of magnitude below this
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME = "image"
# metadata_props keys written by export_model; lists, numbers and label names are JSON, the others plain text
DATA_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


class MissingExtraError(StvitError):
    """An optional dependency (a ``pip install stvit[EXTRA]`` extra) is not installed."""


class ExportCheckError(StvitError):
    """The exported file does not reproduce PyTorch's outputs within the tolerance."""


def require_extra(extra: str, modules: Sequence[str], purpose: str) -> None:
    """Import ``modules``; if any is missing, raise one line naming them and ``pip install 'stvit[EXTRA]'``."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(modules)} (missing: {', '.join(missing)}): "
                                f"pip install 'stvit[{extra}]'")


# ---------------------------------------------------------------------------------------------------------------
# The model to deploy


def _architecture(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def _not_stvit(spec: str, architecture: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{spec} is not an STViT model (architecture {architecture}): convert it first with 'stvit convert', "
        "or give a source name with num_semantic_tokens / semantic_tokens_per_window to convert it on the fly")


def load_stvit_model(
    spec: str,
    *,
    num_semantic_tokens: Optional[int] = None,
    semantic_tokens_per_window: Optional[int] = None,
    recovery: bool = False,
    pretrained: bool = True,
    features_only: bool = False,
) -> nn.Module:
    """The STViT model ``spec`` names, in eval mode.

    ``spec``: a model directory, ``local-dir:DIR`` or ``hf-hub:org/name`` (its tokens are fixed: token
    arguments are refused); an ``stvit_*`` name (built with the token arguments, with its pretrained weights
    unless ``pretrained=False``); or a timm DeiT/ViT/Swin name, converted on the fly as ``stvit convert`` does
    when a token argument or ``recovery`` says how (a bare source name is not an STViT model).
    ``features_only``: timm's feature-map model of an STViT-R model (built by timm from the saved model).
    """
    from .checkpoint import load_model
    from .convert import convert_pair, resolve_source_name

    given = {"num_semantic_tokens": num_semantic_tokens, "semantic_tokens_per_window": semantic_tokens_per_window,
             "recovery": recovery or None}
    given = {k: v for k, v in given.items() if v is not None}
    if names_a_saved_model(spec):
        if given or not pretrained:
            names = [f"{k}={v}" for k, v in sorted(given.items())] + ([] if pretrained else ["pretrained=False"])
            raise InvalidArgumentError(f"{', '.join(names)} cannot apply to a saved model ({spec}): it is used as "
                                       "it was converted")
        model = load_model(spec)
    elif spec.startswith("stvit_"):
        if recovery:
            raise InvalidArgumentError(f"recovery=True cannot apply to {spec}: the architecture name says which it is")
        model = load_model(spec, pretrained=pretrained, **{k: v for k, v in given.items() if k != "recovery"})
    else:
        name = resolve_source_name(spec)  # unknown names fail here
        if not given:
            raise _not_stvit(spec, name.split(".")[0])
        stvit_kwargs = {k: v for k, v in given.items() if k != "num_semantic_tokens"}
        model = convert_pair(name, num_semantic_tokens=num_semantic_tokens, pretrained=pretrained,
                             **stvit_kwargs)[1]
    architecture = _architecture(model)
    if not architecture.startswith("stvit_"):
        raise _not_stvit(spec, architecture)
    if features_only:
        model = _features_model(spec, model, architecture)
    return model.eval()


def _features_model(spec: str, model: nn.Module, architecture: str) -> nn.Module:
    """timm's ``features_only`` model of ``model``, built by timm's own path from the saved model."""
    from .checkpoint import load_model, save_model

    if not architecture.startswith("stvit_r_"):
        raise InvalidArgumentError(
            f"features_only needs an STViT-R model (stvit_r_*): {architecture} ends on its semantic tokens and "
            "has no full-resolution feature maps (convert with --recovery, or a Swin model)")
    if names_a_saved_model(spec):
        return load_model(spec, features_only=True)
    with tempfile.TemporaryDirectory(prefix="stvit-features-") as tmp:
        save_model(model, Path(tmp) / "model")
        return load_model(Path(tmp) / "model", features_only=True)


def is_features_model(model: nn.Module) -> bool:
    # timm's features_only wrappers carry a FeatureInfo (public); classification models a plain list of dicts
    from timm.models import FeatureInfo

    return isinstance(getattr(model, "feature_info", None), FeatureInfo)


# ---------------------------------------------------------------------------------------------------------------
# Metadata: the preprocessing and class names a serving stack needs


def _class_names(model: nn.Module) -> Optional[List[str]]:
    from .predict import class_names

    return None if is_features_model(model) else class_names(model)


def onnx_metadata(model: nn.Module) -> Dict[str, str]:
    """``metadata_props`` of the model's ONNX file: preprocessing (timm's data config), class names, provenance."""
    from . import __version__
    from .data import model_data_config

    config = model_data_config(model)
    meta: Dict[str, str] = {
        "model_name": _architecture(model),
        "stvit_version": __version__,
        "output": "features" if is_features_model(model) else "logits",
        "input_size": json.dumps([int(v) for v in config["input_size"]]),
        "mean": json.dumps([float(v) for v in config["mean"]]),
        "std": json.dumps([float(v) for v in config["std"]]),
        "crop_pct": json.dumps(float(config.get("crop_pct") or 1.0)),
        "crop_mode": str(config.get("crop_mode") or "center"),
        "interpolation": str(config.get("interpolation") or "bicubic"),
    }
    names = _class_names(model)
    if names is not None:
        meta["label_names"] = json.dumps(names)
    return meta


def read_onnx_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The ``metadata_props`` of an ONNX file written by :func:`export_model`, JSON values decoded."""
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
    return meta


def onnx_data_config(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The data config (what ``stvit_core.data.build_transform`` / timm's ``create_transform`` take) of an ONNX
    file's metadata: the same values, hence the same transform, as the model it was exported from."""
    return {"input_size": tuple(meta["input_size"]), "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
            "crop_pct": meta["crop_pct"], "crop_mode": meta.get("crop_mode", "center"),
            "interpolation": meta.get("interpolation", "bicubic")}


# ---------------------------------------------------------------------------------------------------------------
# Running exported files


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
            raise InvalidArgumentError(f"device={device}: this onnxruntime has no CUDAExecutionProvider "
                                       "(install onnxruntime-gpu)")
        index = int(spec.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]  # type: ignore[list-item]
    if spec == "auto":
        return (["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available
                else ["CPUExecutionProvider"])
    raise InvalidArgumentError(f"device={device}: onnxruntime runs on cpu or cuda")


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


def refuse_folder_name(output: Union[str, os.PathLike]) -> None:
    """An output path that ends in a path separator names a folder (``Path()`` would drop the separator and
    write a file of that name): InvalidArgumentError."""
    text = os.fspath(output)
    if isinstance(text, str) and text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        suffix = "".join(Path(text).suffixes) or ".onnx"
        raise InvalidArgumentError(f"{text} ends in {text[-1]}, so it names a folder; the output is one file: name it "
                                   f"(e.g. {text}model{suffix})")


def check_output_path(output: Union[str, os.PathLike], *, force: bool = False) -> Path:
    """Fail now, before any slow work, if ``output`` names a folder (ends in a path separator), exists (without
    ``force``) or its folder cannot be written."""
    refuse_folder_name(output)
    output = Path(output)
    if output.is_dir():
        raise OutputExistsError(f"{output} is a directory; the export is one file")
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists (use --force to overwrite)")
    parent = output.parent
    blocking_file = file_in_the_way(parent)
    if blocking_file is not None:
        raise StvitError(f"cannot write {output}: {blocking_file} is a file, not a folder")
    if not parent.is_dir():
        raise StvitError(f"cannot write {output}: folder {parent} does not exist")
    with _temporary_file(output):  # a real write: permissions, read-only file systems, root on /sys
        pass
    return output


@contextlib.contextmanager
def _temporary_file(output: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of ``output``, removed when the block ends (``_rename_into_place`` keeps it)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{output.name}.tmp-", suffix=suffix, dir=output.parent)
    except OSError as e:
        raise StvitError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _rename_into_place(tmp: Path, output: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give what a plain open() would
        os.replace(tmp, output)
    except OSError as e:
        raise StvitError(f"cannot write {output}: {e.strerror or first_line(e)}") from None


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
    from .data import model_data_config

    size = tuple(model_data_config(model)["input_size"])
    return {b: torch.randn(b, *size, generator=torch.Generator().manual_seed(1000 + b)) for b in batch_sizes}


def trace_model(model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool) -> Any:
    """``torch.export.export`` of ``model`` at ``example``, its batch dimension dynamic or fixed."""
    from torch.export import Dim

    # the example batch must not be 1 for a dynamic batch: torch.export specialises sizes 0 and 1
    dynamic_shapes = ({0: Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with _quiet():
            return torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise StvitError(f"cannot export {_architecture(model)} with torch.export: {first_line(e)}") from None


def default_onnx_opset() -> Optional[int]:
    """The opset torch's exporter writes when none is asked for (it builds opset 18 and converts to this one);
    None when this torch does not say."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    default = getattr(_constants, "ONNX_DEFAULT_OPSET", None)
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
        raise InvalidArgumentError(f"opset applies to ONNX only, not format={format}")
    if batch_size is not None and batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
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
    result: Dict[str, Any] = {"model": _architecture(model), "tokens": getattr(classifier, "num_semantic_tokens", None),
                              "tokens_per_window": getattr(classifier, "semantic_tokens_per_window", None),
                              "output": str(output), "format": format,
                              "dynamic_batch": dynamic, "batch_size": batch_size, "opset": None,
                              "input_size": list(inputs[example_batch].shape[1:]), "outputs": names}
    with _temporary_file(output, suffix=f".{format}") as tmp:  # torch.export.load wants a name ending in .pt2
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
        _rename_into_place(tmp, output)
    result.update(checks=[{"batch_size": b, "max_abs_diff": diffs[b]} for b in checks],
                  max_abs_diff=diffs[worst_batch], tolerance=tolerance, size_mb=round(size / 2**20, 2))
    return result
