"""One way to get a model: :func:`load_model` turns a model spec into a model, for every command and for users.

A spec is one of:

* a saved model: a model directory (``config.json`` + ``model.safetensors``), ``local-dir:DIR`` or
  ``hf-hub:org/name[@revision]``. Its architecture, tokens and weights are fixed: options that build or convert
  a model cannot apply to it.
* an ``stvit_*`` name: built by timm with the token options, with its pretrained weights (converted on load),
  a local ``checkpoint`` or random weights.
* a timm DeiT/ViT/Swin name or a short alias (``deit_small``, ``swin_tiny``): the source model with its
  pretrained weights (or ``checkpoint``), converted to STViT when ``convert=True`` or when a token option or
  ``recovery`` says how; otherwise returned as it is (a baseline, or a distillation teacher).

Models converted here or loaded from a saved model carry their provenance in ``model.stvit_metadata`` (source
model, GFLOPs...), which fine-tuning writes into the saved model's ``config.json``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.models import get_model_args

from . import models  # noqa: F401  (registers the STViT architectures with timm)
from .checkpoint import (
    load_saved_model,
    load_state_dict_file,
    load_state_dict_strictly,
    names_a_saved_model,
    read_saved_config,
)
from .convert import (
    DEFAULT_TOKENS,
    check_family_options,
    conversion_metadata,
    convert_pair,
    load_source_model,
    resolve_source_name,
)
from .errors import CheckpointError, DownloadError, InvalidArgumentError, StvitError, first_line
from .hub_access import require_pretrained_weights

__all__ = ["architecture_of", "base_model_for", "is_stvit", "load_model"]

PathLike = Union[str, os.PathLike]


def load_model(
    spec: PathLike,
    *,
    num_semantic_tokens: Optional[int] = None,
    semantic_tokens_per_window: Optional[int] = None,
    recovery: Optional[bool] = None,
    pretrained: bool = True,
    checkpoint: Optional[PathLike] = None,
    convert: Optional[bool] = None,
    stvit_only: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The model ``spec`` names (see the module docstring), ready to use.

    Args:
        spec: a model directory, ``local-dir:DIR``, ``hf-hub:org/name[@rev]``, an ``stvit_*`` name, or a timm
            DeiT/ViT/Swin name or alias.
        num_semantic_tokens: semantic tokens of an STViT-DeiT/ViT (default 16 when converting).
        semantic_tokens_per_window: semantic tokens per window of an STViT-R-Swin (default 9).
        recovery: convert a DeiT/ViT to STViT-R (dumbbell units that keep the full token map).
        pretrained: the name's pretrained weights; False for random weights (nothing is downloaded).
        checkpoint: a local weights file for a name (``.safetensors``, ``.pth``...; never unpickles code).
        convert: True converts a source name even without token options; None (default) converts it only when
            a token option or ``recovery`` is given; a saved model or ``stvit_*`` name is never converted.
        stvit_only: refuse what is not an STViT model (a source name without token options, a saved plain timm
            model) in one line, before anything is downloaded.
        **kwargs: go to ``timm.create_model`` (``num_classes``, ``img_size``, ``drop_path_rate``,
            ``features_only``...). For a converted source name, ``num_classes`` resets the converted head and
            ``drop_path_rate`` goes to the STViT model; the others shape the source.

    Errors are one-line :class:`~stvit_core.errors.StvitError` messages; downloads fail at once when offline.
    """
    spec = str(spec)
    try:
        model = _load(spec, num_semantic_tokens=num_semantic_tokens, semantic_tokens_per_window=semantic_tokens_per_window,
                      recovery=recovery, pretrained=pretrained, checkpoint=checkpoint, convert=convert,
                      stvit_only=stvit_only, **kwargs)
    except StvitError:  # already one line about what the user gave
        raise
    except (AssertionError, TypeError, ValueError, ZeroDivisionError) as e:  # how timm constructors reject shapes
        given = f" with {kwargs}" if kwargs else ""
        raise InvalidArgumentError(f"cannot build {spec}{given}: {first_line(e)}") from None
    if stvit_only and not is_stvit(model):
        raise _not_stvit(spec, architecture_of(model))
    return model


def _load(spec: str, *, num_semantic_tokens: Optional[int], semantic_tokens_per_window: Optional[int],
          recovery: Optional[bool], pretrained: bool, checkpoint: Optional[PathLike], convert: Optional[bool],
          stvit_only: bool, **kwargs: Any) -> nn.Module:
    conversion = {k: v for k, v in dict(num_semantic_tokens=num_semantic_tokens,
                                         semantic_tokens_per_window=semantic_tokens_per_window,
                                         recovery=recovery or None).items() if v is not None}
    if checkpoint is not None and not pretrained:
        raise InvalidArgumentError("{checkpoint} and {pretrained=} exclude each other", checkpoint=checkpoint,
                                   pretrained=False)
    if names_a_saved_model(spec):
        refused = dict(conversion, **({} if pretrained else {"pretrained": False}),
                       **({} if checkpoint is None else {"checkpoint": checkpoint}))
        if refused:
            fields = ", ".join(f"{{{name}=}}" for name in refused)
            raise InvalidArgumentError(
                f"{fields} cannot apply to a saved model ({spec}): it has its own weights and semantic tokens "
                "(convert its source again to change them)", **refused)
        model = load_saved_model(spec, **kwargs)
        model.stvit_metadata = _recorded_metadata(spec)
        return model
    if spec.startswith("stvit_"):
        return _named_stvit(spec, conversion, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    name = resolve_source_name(spec)  # unknown names fail here
    if not conversion and not convert:
        if stvit_only:
            raise _not_stvit(spec, name.split(".")[0])
        return load_source_model(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    return _converted(name, conversion, pretrained=pretrained, checkpoint=checkpoint, **kwargs)


def _named_stvit(spec: str, conversion: Dict[str, Any], *, pretrained: bool, checkpoint: Optional[PathLike],
                 **kwargs: Any) -> nn.Module:
    if "recovery" in conversion:
        raise InvalidArgumentError(f"{{recovery=}} cannot apply to {spec}: the architecture name says which it is",
                                   recovery=True)
    if not timm.is_model(spec):
        raise InvalidArgumentError(f"unknown model {spec!r}: not a registered stvit_* architecture")
    check_family_options("swin" in spec, conversion.get("num_semantic_tokens"),
                         conversion.get("semantic_tokens_per_window"))
    download = pretrained and checkpoint is None
    if download:
        require_pretrained_weights(spec)
    try:
        model = timm.create_model(spec, pretrained=download, **conversion, **kwargs)
    except (AssertionError, TypeError, ValueError, ZeroDivisionError):  # a model argument it cannot take
        raise
    except Exception as e:
        if not download:
            raise
        raise DownloadError(f"cannot load pretrained weights for {spec}: {first_line(e)}") from None
    if checkpoint is not None:
        _load_weights(model, checkpoint)
    model.stvit_metadata = {}
    return model


def _converted(name: str, conversion: Dict[str, Any], *, pretrained: bool, checkpoint: Optional[PathLike],
               **kwargs: Any) -> nn.Module:
    check_family_options("swin" in name, conversion.get("num_semantic_tokens"),
                         conversion.get("semantic_tokens_per_window"), conversion.get("recovery"))
    # The source keeps its own head (its checkpoint's) so that its weights load strictly; num_classes resets the
    # converted model's head after.
    num_classes = kwargs.pop("num_classes", None)
    stvit_kwargs = {k: kwargs.pop(k) for k in ("drop_path_rate",) if k in kwargs}
    tokens = conversion.pop("num_semantic_tokens", None)
    if "swin" not in name and tokens is None:
        tokens = DEFAULT_TOKENS
    source, model = convert_pair(name, num_semantic_tokens=tokens, pretrained=pretrained, checkpoint=checkpoint,
                                 source_kwargs=kwargs, **conversion, **stvit_kwargs)
    metadata = conversion_metadata(source, model, source_name=name)
    metadata["source_weights"] = str(checkpoint) if checkpoint else (f"timm/{name}" if pretrained else "random")
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": num_classes}
    model.stvit_metadata = metadata
    return model


def _load_weights(model: nn.Module, checkpoint: PathLike) -> None:
    load_state_dict_strictly(model, load_state_dict_file(checkpoint),
                             f"{checkpoint} does not fit {architecture_of(model)}")


def _recorded_metadata(spec: str) -> Dict[str, Any]:
    """The ``stvit`` record of a saved model's config.json ({} when it has none)."""
    try:
        record = read_saved_config(spec).get("stvit")
    except Exception:  # the model itself loaded: provenance is informative, never a reason to stop
        return {}
    return dict(record) if isinstance(record, dict) else {}


def architecture_of(model: nn.Module) -> str:
    """The registered architecture name of a timm model (its class name when it has none)."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def is_stvit(model: nn.Module) -> bool:
    return architecture_of(model).startswith("stvit_")


def _not_stvit(spec: str, architecture: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{spec} is not an STViT model (architecture {architecture}): convert it first with 'stvit convert', or give "
        "a source name with {num_semantic_tokens} / {semantic_tokens_per_window} to convert it on the fly",
        num_semantic_tokens=None, semantic_tokens_per_window=None)


def base_model_for(model: nn.Module, source_name: Optional[str] = None) -> nn.Module:
    """The source architecture of an STViT ``model``, shaped as it is (patch size, width, depth, classes, input
    size), randomly initialised: the baseline a benchmark times it against.

    ``source_name`` defaults to the source recorded in ``model.stvit_metadata``.
    """
    metadata = getattr(model, "stvit_metadata", None) or {}
    source_name = source_name or metadata.get("source_model")
    if not source_name:
        raise CheckpointError(f"{architecture_of(model)} does not record its source model "
                              "(config.json 'stvit.source_model')")
    arch = source_name.split(".")[0]
    model_args = get_model_args(model)  # what timm's factory recorded: the saved model's shape
    with torch.device("meta"):
        cls = type(timm.create_model(arch, pretrained=False))
    takes = inspect.signature(cls.__init__).parameters
    args = {k: v for k, v in model_args.items() if k in takes}
    args.update(num_classes=model.num_classes, img_size=tuple(model.pretrained_cfg["input_size"][1:]))
    try:
        return timm.create_model(arch, pretrained=False, **args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build the base model {arch} shaped as the saved one: {first_line(e)}") from None
