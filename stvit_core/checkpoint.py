"""The on-disk model format and safe loading of foreign weight files.

A model directory holds ``config.json`` in timm's Hugging Face Hub format (architecture, num_classes,
``model_args``, ``pretrained_cfg``) plus ``model.safetensors``. The same directory therefore loads with
``stvit_core.load_model(DIR)``, ``timm.create_model('local-dir:DIR', pretrained=True)`` and, once pushed,
``timm.create_model('hf-hub:org/name', pretrained=True)``. An extra ``stvit`` key in config.json records
where the model came from (source model, GFLOPs...) for model cards and reports; timm ignores it.

Directories are written through :func:`stvit_core.files.atomic_directory`, so a crash or a full disk never
leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from timm.models import load_state_dict, save_for_hf

from .data import label_names_problem, preprocessing_problem
from .errors import CheckpointError, DownloadError, StvitError, first_line
from .files import atomic_directory
from .hub_access import require_hub_files, split_repo_spec
from .models.swin import RELEASE_PICKLE_GLOBALS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PathLike = Union[str, os.PathLike]


def model_args_of(model: nn.Module) -> Dict[str, Any]:
    """The keyword arguments that rebuild ``model`` with ``timm.create_model(architecture, **args)``."""
    args = dict(getattr(model, "stvit_model_args", None) or {})
    return args


def save_model(
    model: nn.Module,
    output_dir: PathLike,
    *,
    force: bool = False,
    metadata: Optional[Mapping[str, Any]] = None,
    model_args: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Save ``model`` as ``config.json`` + ``model.safetensors`` in ``output_dir``, atomically.

    Args:
        model: a timm model (it must have ``pretrained_cfg``, as every model from ``timm.create_model`` has).
        output_dir: the directory to create.
        force: replace an existing directory.
        metadata: JSON-serialisable facts stored under the ``stvit`` key of config.json.
        model_args: constructor keyword arguments that rebuild the architecture (recorded as timm's
            ``model_args``); defaults to what the STViT constructors recorded on the model.
    """
    args = model_args_of(model)
    args.update(model_args or {})
    model_config: Dict[str, Any] = {}
    if metadata:
        model_config["stvit"] = dict(metadata)
    with atomic_directory(output_dir, force=force) as tmp:
        try:
            save_for_hf(model, str(tmp), model_config=model_config, model_args=args, safe_serialization=True)
        except ValueError as e:  # e.g. a model argument that is not JSON serialisable
            raise CheckpointError(f"cannot save model: {e}") from None
    return Path(output_dir)


def read_config(model_dir: PathLike) -> Dict[str, Any]:
    """Read and check a model directory's config.json."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CheckpointError(f"{model_dir} does not exist (not a model directory, hf-hub: id or model name)")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is a file, not a model directory (config.json + weights)")
    cfg_path = model_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{model_dir} is not a model directory: {CONFIG_NAME} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise CheckpointError(f"{cfg_path} has no 'architecture' field; not a timm model config")
    check_config(cfg, str(cfg_path))
    return cfg


def check_config(cfg: Mapping[str, Any], where: str) -> None:
    """Raise one line naming ``where`` (the file) and the field when a config.json field has a wrong type or value.

    Checked once where the file is read, so that no command meets a wrong field later as a traceback (timm's
    loader, the transforms, the class names of predictions...). Only the fields stvit and timm read are checked.
    """
    problem = _config_problem(cfg)
    if problem:
        raise CheckpointError(f"{where}: {problem}")


def _config_problem(cfg: Mapping[str, Any]) -> Optional[str]:
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(cfg.get("architecture"), str) or not cfg["architecture"]:
        return f"architecture is {cfg.get('architecture')!r}, not a model name"
    for key in ("num_classes", "num_features"):
        if key in cfg and not count(cfg[key]):
            return f"{key} is {cfg[key]!r}, not a whole number"
    model_args = cfg.get("model_args", {})
    if not isinstance(model_args, dict):
        return f"model_args is {type(model_args).__name__}, not a mapping of constructor arguments"
    in_chans = model_args.get("in_chans")
    if in_chans is not None and not (count(in_chans) and in_chans > 0):
        return f"model_args.in_chans is {in_chans!r}, not a positive whole number"
    # timm reads a config without pretrained_cfg (its older layout) as one flat pretrained_cfg
    pretrained_cfg, prefix = (cfg.get("pretrained_cfg"), "pretrained_cfg.") if "pretrained_cfg" in cfg else (cfg, "")
    if not isinstance(pretrained_cfg, dict):
        return f"pretrained_cfg is {type(pretrained_cfg).__name__}, not a mapping"
    if "num_classes" in pretrained_cfg and not count(pretrained_cfg["num_classes"]):
        return f"{prefix}num_classes is {pretrained_cfg['num_classes']!r}, not a whole number"
    problem = preprocessing_problem(pretrained_cfg, channels=in_chans, prefix=prefix)
    if problem:
        return problem
    num_classes = next((c[k] for c, k in ((cfg, "num_classes"), (pretrained_cfg, "num_classes"),
                                          (model_args, "num_classes")) if c.get(k) is not None), None)
    num_classes = num_classes if count(num_classes) else None
    for holder, field in ((cfg, "label_names"), (pretrained_cfg, f"{prefix}label_names")):
        if holder.get("label_names") is not None:  # timm moves a top-level label_names into pretrained_cfg
            problem = label_names_problem(holder["label_names"], num_classes, field=field)
            if problem:
                return problem
    record = cfg.get("stvit", {})
    if not isinstance(record, dict):
        return f"stvit is {type(record).__name__}, not a mapping"
    source = record.get("source_model")
    if source is not None and not (isinstance(source, str) and source):
        return f"stvit.source_model is {source!r}, not a model name"
    return None


def names_a_path(spec: Union[str, PathLike]) -> bool:
    """Whether a model spec is meant as a path (it exists, has a separator, or starts with '.') rather than a
    model name: such a spec is loaded as a model directory, so that a folder without config.json or a missing
    one is reported as such, never as an unknown model name."""
    spec = str(spec)
    return Path(spec).exists() or os.sep in spec or "/" in spec or spec.startswith(".")


def names_a_saved_model(spec: Union[str, PathLike]) -> bool:
    """A saved model (a directory, ``local-dir:DIR`` or ``hf-hub:org/name``) rather than a model name: its
    architecture, tokens and weights are fixed, so options that build or convert a model cannot apply."""
    return str(spec).startswith(("hf-hub:", "local-dir:")) or names_a_path(spec)


def load_saved_model(spec: Union[str, PathLike], **kwargs: Any) -> nn.Module:
    """A saved model: a directory, ``local-dir:DIR`` or ``hf-hub:org/name[@revision]``, with its weights.

    timm builds it (``local-dir:`` / ``hf-hub:``), so this returns exactly what ``timm.create_model(...,
    pretrained=True)`` returns; errors become one-line :class:`StvitError` messages, and downloads fail at once
    when offline. Keyword arguments go to ``timm.create_model`` (e.g. ``num_classes``, ``features_only``).
    Most callers want :func:`stvit_core.load_model`, which takes every kind of model spec.
    """
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        return _create_from_hub(spec, **kwargs)
    return _create_from_directory(Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec), **kwargs)


def read_saved_config(spec: Union[str, PathLike]) -> Dict[str, Any]:
    """The config.json of a saved model (a directory, ``local-dir:DIR`` or ``hf-hub:org/name[@rev]``)."""
    spec = str(spec)
    if not spec.startswith("hf-hub:"):
        return read_config(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec)
    repo_id, revision = split_repo_spec(spec)
    try:  # a cache hit once the model has been loaded
        cfg = json.loads(Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision)).read_text())
    except Exception as e:
        raise DownloadError(f"cannot read the config of {spec}: {first_line(e)}") from None
    where = f"{spec} {CONFIG_NAME}"
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise CheckpointError(f"{where} has no 'architecture' field; not a timm model config")
    check_config(cfg, where)
    return cfg


def _create_from_directory(path: Path, **kwargs: Any) -> nn.Module:
    cfg = read_config(path)
    if not timm.is_model(cfg["architecture"]):
        raise CheckpointError(f"{path}: unknown architecture {cfg['architecture']!r}")
    if not (path / WEIGHTS_NAME).is_file() and not (path / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{path} has no weights file ({WEIGHTS_NAME})")
    try:
        return timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
    except StvitError:
        raise
    except Exception as e:  # corrupt safetensors, config and weights that disagree...
        detail = _directory_mismatch(path, cfg, kwargs) or first_line(e)
        raise CheckpointError(f"cannot load {path}: {detail}") from None


def _directory_mismatch(path: Path, cfg: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Optional[str]:
    """How config.json's model and the weights file differ (keys, shapes), or None when they do not."""
    try:
        with torch.device("meta"):
            model = timm.create_model(cfg["architecture"], **{**(cfg.get("model_args") or {}),
                                                              "num_classes": cfg.get("num_classes", 1000), **kwargs})
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # the weights file is unreadable, or the config cannot build: the original error says it
        return None
    mismatch = state_dict_mismatch(model.state_dict(), found)
    return f"{CONFIG_NAME} and {WEIGHTS_NAME} disagree: {mismatch}" if mismatch else None


def _create_from_hub(spec: str, **kwargs: Any) -> nn.Module:
    repo_id, revision = split_repo_spec(spec)  # an empty revision (org/name@) is an error, not main
    require_hub_files(repo_id, [(CONFIG_NAME,), (WEIGHTS_NAME, "pytorch_model.bin")], revision=revision, what=spec)
    read_saved_config(spec)  # its fields checked before timm reads them
    try:
        return timm.create_model(spec, pretrained=True, **kwargs)
    except Exception as e:
        raise DownloadError(f"cannot load {spec}: {first_line(e)}") from None


def state_dict_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], limit: int = 3) -> str:
    """What differs between two state dicts (tensors or shapes): the first missing, unexpected and mis-shaped keys.

    Returns "" when they match. ``expected`` is what the model has, ``found`` what the file holds.
    """
    def shape(value: Any) -> Tuple[int, ...]:
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    def listed(keys: list) -> str:
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mis_shaped = [f"{k} (file {list(shape(found[k]))}, model {list(shape(expected[k]))})"
                  for k in expected if k in found and shape(found[k]) != shape(expected[k])]
    parts = [f"{label} {listed(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)) if keys]
    return "; ".join(parts)


def load_state_dict_strictly(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` into ``model`` strictly; when keys or shapes differ, one line: ``WHAT: missing ...``."""
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"{what}: {mismatch}")
    model.load_state_dict(state_dict, strict=True)


def looks_like_stvit(state_dict: Mapping[str, Any]) -> bool:
    """True for the weights of an STViT / STViT-R model (semantic token generator or dumbbell units)."""
    return any(_STVIT_KEY.search(k) for k in state_dict)


_STVIT_KEY = re.compile(r"(^|\.)(semantic_token_generator|semantic_blocks|units\.\d+\.generator)\.")


def load_state_dict_file(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load a weights file without executing pickled code.

    Accepts ``.safetensors`` and torch files (``.pth``/``.pt``/``.bin``) holding a plain state dict or one
    nested under ``state_dict_ema``/``model_ema``/``state_dict``/``model`` (timm's ``load_state_dict`` picks
    it, EMA weights first, and strips a DataParallel/DDP ``module.`` prefix).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=True, and only our config stand-ins allowed besides tensors: a checkpoint never runs code
        with torch.serialization.safe_globals(RELEASE_PICKLE_GLOBALS):
            obj: Any = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except (AttributeError, TypeError):  # loaded, but timm found no mapping to unwrap (a list, a number...)
        obj = None
    except Exception as e:
        raise CheckpointError(unreadable_checkpoint_message(path, e)) from None
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def unreadable_checkpoint_message(path: PathLike, error: BaseException) -> str:
    """One line for a weights file torch or safetensors cannot read; never torch's advice to turn safety off."""
    # torch's weights-only unpickler names the global it refused (timm re-raises it, the original as the cause)
    chain = [error, error.__cause__, error.__context__]
    refused = next((m for e in chain if e is not None and (m := re.search(r"GLOBAL\s+([\w.]+)", str(e)))), None)
    if refused:
        return (f"refusing to load {path}: it needs the Python object {refused.group(1)}, and unpickling it could "
                "run code (only tensors and plain containers are read); export a plain state dict or safetensors")
    kind = "safetensors file" if str(path).endswith(".safetensors") else "PyTorch checkpoint"
    return f"cannot read {path}: not a {kind} (or corrupt)"
