"""Source model + weights -> STViT model.

:func:`convert_model` turns a timm DeiT/ViT into STViT (``recovery=True``: STViT-R) and a timm Swin into STViT-R,
carrying every one of its weights (see :func:`stvit_core.models.deit.checkpoint_filter_fn` and
:func:`stvit_core.models.swin.checkpoint_filter_fn`); :func:`convert_to_directory` is ``stvit convert``. Building
the source from a name, with its pretrained weights or a local ``checkpoint``, is :func:`stvit_core.load_model`'s
job (through :func:`convert_pair` here); a ``checkpoint`` in the official STViT-R release format
(``STViT-R-Swin-S.pth`` / ``-B.pth``) is recognised and loaded as the released model (conv stem); one of the
released COCO detectors (mmdetection format) gives its backbone, in the detection layout, without the neck and heads.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .checkpoint import load_state_dict_file, load_state_dict_strictly, looks_like_stvit, save_model
from .errors import CheckpointError, DownloadError, InvalidArgumentError, OutputExistsError, StvitError, first_line
from .flops import count_flops, count_params
from .hub_access import require_pretrained_weights
from .models.deit import checkpoint_filter_fn as deit_checkpoint_filter_fn
from .models.deit import recovery_checkpoint_filter_fn
from .models.swin import checkpoint_filter_fn as swin_checkpoint_filter_fn
from .models.swin import detection_backbone_state_dict, is_detector_state_dict, is_release_state_dict

__all__ = ["SOURCE_ALIASES", "convert_model", "convert_to_directory", "default_output_name"]

DEFAULT_TOKENS = 16  # DeiT/ViT: semantic tokens (the paper's headline setting)
DEFAULT_TOKENS_PER_WINDOW = 9  # Swin: semantic tokens per 7x7 window (as released)

# Short names accepted by the CLI -> the timm model (with pretrained tag) they stand for.
SOURCE_ALIASES: Dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
    "swin_tiny": "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_small": "swin_small_patch4_window7_224.ms_in1k",
    "swin_base": "swin_base_patch4_window7_224.ms_in1k",
}

# Source widths whose STViT architecture has its own registered name (and pretrained config).
_DEIT_ARCHITECTURES = {192: "stvit_deit_tiny_patch16_224", 384: "stvit_deit_small_patch16_224", 768: "stvit_deit_base_patch16_224"}
_DEIT_R_ARCHITECTURES = {
    192: "stvit_r_deit_tiny_patch16_224", 384: "stvit_r_deit_small_patch16_224", 768: "stvit_r_deit_base_patch16_224",
}
_SWIN_ARCHITECTURES = {
    (96, (2, 2, 6, 2)): "stvit_r_swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2)): "stvit_r_swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2)): "stvit_r_swin_base_patch4_window7_224",
}


def resolve_source_name(name: str) -> str:
    """Map a CLI alias or timm name to a timm model name; raise a one-line error for unknown names."""
    name = SOURCE_ALIASES.get(name, name)
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise InvalidArgumentError(
            f"unknown model {name!r}: expected {'|'.join(SOURCE_ALIASES)} or a timm DeiT/ViT/Swin name"
        )
    return name


def load_source_model(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    **kwargs: Any,
) -> nn.Module:
    """The source model with its weights: a local checkpoint, timm's pretrained weights, or random init."""
    name = resolve_source_name(name)
    if "img_size" in kwargs:
        _check_img_size(name, kwargs)
    if checkpoint is not None:
        return _source_from_checkpoint(name, checkpoint, **kwargs)
    if pretrained:
        hint = "; pass --checkpoint FILE for local weights or --no-pretrained"
        require_pretrained_weights(name, hint=hint)  # fails at once offline instead of after a minute of retries
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise DownloadError(f"cannot download pretrained weights for {name} ({first_line(e)}){hint}") from None
    return timm.create_model(name, pretrained=False, **kwargs)


def _check_img_size(name: str, kwargs: Dict[str, Any]) -> None:
    """An image size that is not a whole number of patches: timm's patch embedding would drop the remainder."""
    with torch.device("meta"):  # the layout only, before any download
        patch = tuple(timm.create_model(name, pretrained=False, **kwargs).patch_embed.patch_size)
    size = kwargs["img_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if any(s % p for s, p in zip(size, patch)):
        raise InvalidArgumentError(f"{{img_size=}} is not a multiple of {name}'s {patch[0]}-pixel patches: the last "
                                   "pixels would be dropped", img_size=size[0] if size[0] == size[1] else size)


def _source_from_checkpoint(name: str, checkpoint: Union[str, os.PathLike], **kwargs: Any) -> nn.Module:
    state_dict = load_state_dict_file(checkpoint)
    if looks_like_stvit(state_dict):
        raise CheckpointError(
            f"{checkpoint} is already an STViT model: no conversion needed; use its directory wherever a model "
            "is taken (stvit eval / finetune / benchmark DIR, stvit_core.load_model(DIR))")
    head = state_dict.get("head.weight", state_dict.get("head.fc.weight"))
    if head is not None and head.ndim == 2:
        kwargs.setdefault("num_classes", head.shape[0])  # a fine-tuned source keeps its own head size
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        state_dict = _source_filter(model)(state_dict, model)
    except Exception as e:  # a foreign layout can fail inside the family's filter
        raise CheckpointError(f"{checkpoint} does not fit {name}: {first_line(e)}") from None
    load_state_dict_strictly(model, state_dict, f"{checkpoint} does not fit {name}")
    return model


def _source_filter(model: nn.Module):
    """The checkpoint filter timm uses for ``model``'s family (handles foreign layouts, resampling)."""
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return lambda sd, m: sd
    return fn


def _vit_model_args(source: nn.Module) -> Tuple[str, Dict[str, Any]]:
    if not isinstance(source, VisionTransformer):
        raise InvalidArgumentError(f"cannot convert {type(source).__name__}: expected a timm DeiT/ViT model")
    if getattr(source, "attn_pool", None) is not None or getattr(source, "num_reg_tokens", 0):
        raise InvalidArgumentError("ViTs with attention pooling or register tokens are not supported")
    block = source.blocks[0]
    args: Dict[str, Any] = dict(
        img_size=tuple(source.patch_embed.img_size),
        patch_size=tuple(source.patch_embed.patch_size)[0],
        in_chans=source.patch_embed.proj.in_channels,
        num_classes=source.num_classes,
        embed_dim=source.embed_dim,
        depth=len(source.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / source.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        class_token=source.cls_token is not None,
        global_pool=source.global_pool,
        no_embed_class=source.no_embed_class,
        pre_norm=not isinstance(source.norm_pre, nn.Identity),
    )
    if hasattr(block.ls1, "gamma"):
        args["init_values"] = 1e-5
    if not isinstance(source.fc_norm, nn.Identity):
        args["fc_norm"] = True
    arch = _DEIT_ARCHITECTURES.get(source.embed_dim, "stvit_vit_patch16_224")
    return arch, args


def check_family_options(is_swin: bool, num_semantic_tokens: Optional[int] = None,
                         semantic_tokens_per_window: Optional[int] = None, recovery: Optional[bool] = None) -> None:
    """Each family takes its own token option (the other one is refused, never silently ignored), and only
    DeiT/ViT has a choice of recovery: Swin always converts to STViT-R."""
    names = dict(num_semantic_tokens=None, semantic_tokens_per_window=None)
    if is_swin and num_semantic_tokens is not None:
        raise InvalidArgumentError("{num_semantic_tokens} is for DeiT/ViT; Swin takes {semantic_tokens_per_window} "
                                   "(4, 9 or 16)", **names)
    if not is_swin and semantic_tokens_per_window is not None:
        raise InvalidArgumentError("{semantic_tokens_per_window} is for Swin; DeiT/ViT take {num_semantic_tokens}",
                                   **names)
    if recovery and is_swin:  # not a no-op to ignore: the user expects a different model than Swin's only one
        raise InvalidArgumentError("{recovery=} is for DeiT/ViT; Swin always converts to STViT-R", recovery=True)


def convert_model(source: nn.Module, *, num_semantic_tokens: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """An STViT model with every weight of the timm ViT/DeiT/Swin ``source`` (see the module docstring).

    DeiT/ViT take ``num_semantic_tokens`` (default 16) and ``recovery=True`` for STViT-R; Swin takes
    ``semantic_tokens_per_window`` (default 9). Other keyword arguments override the STViT architecture
    (``num_image_blocks``, ``semantic_token_pool``, ``global_semantic_tokens``, ``global_pool``...).
    Preprocessing (mean, std, crop) is the source's.
    """
    is_swin = isinstance(source, SwinTransformer)
    check_family_options(is_swin, num_semantic_tokens, kwargs.get("semantic_tokens_per_window"))
    recovery = kwargs.pop("recovery", None)
    if is_swin:
        if recovery is False:
            raise InvalidArgumentError("Swin converts to STViT-R only (dumbbell units in stage 3)")
        check_family_options(True, recovery=recovery)
        return _convert_swin(source, **kwargs)
    kwargs.pop("semantic_tokens_per_window", None)
    tokens = DEFAULT_TOKENS if num_semantic_tokens is None else num_semantic_tokens
    if recovery:
        return _convert_vit_recovery(source, num_semantic_tokens=tokens, **kwargs)
    arch, args = _vit_model_args(source)
    if "global_pool" in kwargs and kwargs["global_pool"] != args["global_pool"]:
        # a different readout than the source's: keep the class token only where it is read
        args.pop("class_token")
    args.update(kwargs, num_semantic_tokens=tokens)
    return _build_converted(source, arch, args, deit_checkpoint_filter_fn)


def _build_converted(source: nn.Module, arch: str, args: Dict[str, Any], filter_fn) -> nn.Module:
    """Build ``arch(**args)``, load ``filter_fn(source's weights)`` strictly, keep the source's preprocessing."""
    try:
        model = timm.create_model(arch, pretrained=False, **args)
        state_dict = filter_fn(source.state_dict(), model)
    except StvitError:  # already one line naming its parameter
        raise
    except ValueError as e:  # an argument the architecture cannot take, or a source of another depth
        raise InvalidArgumentError(str(e)) from None
    load_state_dict_strictly(model, state_dict, "conversion left weights unmatched")
    _copy_data_config(source, model)
    model.stvit_model_args = _json_args(args)
    return model


def _json_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor arguments as JSON values (tuples -> lists), recorded for ``save_model``'s config.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def _convert_vit_recovery(source: nn.Module, *, num_semantic_tokens: int = DEFAULT_TOKENS,
                               **kwargs: Any) -> nn.Module:
    """STViT-R-DeiT from a timm ViT/DeiT: its blocks regrouped into dumbbell units, every weight kept."""
    if kwargs.pop("num_image_blocks", None) is not None:
        raise InvalidArgumentError("{num_image_blocks} does not apply to STViT-R (each dumbbell unit starts with one)",
                                   num_image_blocks=None)
    _, args = _vit_model_args(source)
    arch = _DEIT_R_ARCHITECTURES.get(source.embed_dim, "stvit_r_vit_patch16_224")
    if "global_pool" in kwargs and kwargs["global_pool"] != args["global_pool"]:
        args.pop("class_token")
    args.pop("pre_norm", None)
    args.update(kwargs, num_semantic_tokens=num_semantic_tokens)
    return _build_converted(source, arch, args, recovery_checkpoint_filter_fn)


def _swin_model_args(source: nn.Module) -> Tuple[str, Dict[str, Any]]:
    layers = list(source.layers)
    block = layers[0].blocks[0]
    depths = tuple(len(layer.blocks) for layer in layers)
    window = max(max(layer.blocks[0].attn.window_size) for layer in layers)
    args: Dict[str, Any] = dict(
        img_size=tuple(source.patch_embed.img_size),
        in_chans=source.in_chans,
        num_classes=source.num_classes,
        embed_dim=source.embed_dim,
        depths=depths,
        num_heads=tuple(layer.blocks[0].attn.num_heads for layer in layers),
        window_size=window,
        mlp_ratio=block.mlp.fc1.out_features / source.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
    )
    arch = _SWIN_ARCHITECTURES.get((source.embed_dim, depths), "stvit_r_swin_tiny_patch4_window7_224")
    return arch, args


def _convert_swin(source: nn.Module, *, semantic_tokens_per_window: Optional[int] = None,
                       **kwargs: Any) -> nn.Module:
    """STViT-R-Swin from a timm Swin: stage 3 regrouped into dumbbell units, every surviving weight kept.

    The model keeps Swin's patch embedding (``stem='patch'``) unless ``stem='conv'`` is asked for (then the
    stem is newly initialised). See :func:`stvit_core.models.swin.checkpoint_filter_fn` for the mapping.
    """
    check_family_options(True, kwargs.pop("num_semantic_tokens", None), None)
    if kwargs.pop("num_image_blocks", None) is not None:
        raise InvalidArgumentError("{num_image_blocks} does not apply to Swin (each dumbbell unit starts with one)",
                                   num_image_blocks=None)
    if kwargs.get("global_pool") not in (None, "avg"):
        raise InvalidArgumentError("Swin reads out the average of its final map ({global_pool=})", global_pool="avg")
    arch, args = _swin_model_args(source)
    tokens = DEFAULT_TOKENS_PER_WINDOW if semantic_tokens_per_window is None else semantic_tokens_per_window
    args.update(stem="patch", semantic_tokens_per_window=tokens)
    args.update(kwargs)
    return _build_converted(source, arch, args, swin_checkpoint_filter_fn)


def release_model_args(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The STViT-R-Swin constructor arguments of an official release state dict (read off its shapes)."""
    sd = state_dict
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.", k)))
    depths = tuple(
        1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k)))
        for i in range(num_layers)
    )
    heads = tuple(int(sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in range(num_layers))
    table = sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (int(round(table ** 0.5)) + 1) // 2
    embed_dim = int(sd["layers.0.blocks.0.norm1.weight"].shape[0])
    fc1 = sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    head = sd.get("head.weight", sd.get("head.fc.weight"))  # the release's layout, or timm's
    return dict(
        stem="conv", embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
        mlp_ratio=fc1 / embed_dim, num_classes=int(head.shape[0]) if head is not None else 0,
        global_semantic_tokens=any(k.endswith("semantic_token2") for k in sd),
    )


def _release_architecture(args: Dict[str, Any], source_name: str) -> str:
    """The registered STViT-R-Swin whose stage depths the release checkpoint has; it must be ``source_name``'s."""
    base = source_name.split(".")[0]
    alias = next((a for a, full in SOURCE_ALIASES.items() if full.split(".")[0] == base), base)
    arch = _SWIN_ARCHITECTURES.get((args["embed_dim"], args["depths"]))
    if arch is None:  # a custom width: the stage depths must still be the requested model's
        arch = next((a for (dim, depths), a in _SWIN_ARCHITECTURES.items()
                     if depths == args["depths"] and a.startswith(f"stvit_r_{alias}_")), None)
    if arch is None or not arch.startswith(f"stvit_r_{alias}_"):
        raise CheckpointError(
            f"the checkpoint is an STViT-R-Swin with embed_dim {args['embed_dim']} and depths "
            f"{args['depths']}, which does not match {alias}"
        )
    return arch


def _convert_release_checkpoint(
    state_dict: Dict[str, Any], source_name: str, *, semantic_tokens_per_window: Optional[int] = None, **kwargs: Any
) -> nn.Module:
    """An official STViT-R-Swin release state dict -> our model with identical outputs (conv stem).

    ``state_dict`` is the release's ``model`` entry (what :func:`stvit_core.checkpoint.load_state_dict_file`
    returns for the release ``.pth``).
    """
    check_family_options(True, kwargs.pop("num_semantic_tokens", None), None)
    try:
        args = release_model_args(state_dict)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"incomplete STViT-R release checkpoint (missing {e})") from None
    if kwargs.get("num_classes", args["num_classes"]) != args["num_classes"]:
        raise InvalidArgumentError(f"num_classes: the release checkpoint's head has {args['num_classes']} classes; "
                                   "convert it as it is, then fine-tune with a new head")
    arch = _release_architecture(args, source_name)
    if args["global_semantic_tokens"] and semantic_tokens_per_window is None:
        n = next(v for k, v in state_dict.items() if k.endswith("semantic_token2")).shape[1]
        semantic_tokens_per_window = n // 4  # released for 224 px: 2x2 windows in stage 3
    args["semantic_tokens_per_window"] = (DEFAULT_TOKENS_PER_WINDOW if semantic_tokens_per_window is None
                                          else semantic_tokens_per_window)
    args.update(kwargs)
    model = _build_release_model(arch, args, state_dict, "release")
    # the release evaluates as Swin does: bicubic resize to 256, centre crop 224, ImageNet mean/std
    model.pretrained_cfg = dict(model.pretrained_cfg, crop_pct=0.875, interpolation="bicubic")
    model.stvit_model_args = _json_args(args)
    return model


def _build_release_model(arch: str, args: Dict[str, Any], state_dict: Dict[str, Any], what: str) -> nn.Module:
    """``arch`` built with ``args`` and the released ``state_dict`` loaded strictly (timm names, via the filter)."""
    try:
        model = timm.create_model(arch, pretrained=False, **args)
        filtered = swin_checkpoint_filter_fn(state_dict, model)
    except ValueError as e:
        raise CheckpointError(f"cannot convert the {what} checkpoint: {e}") from None
    load_state_dict_strictly(model, filtered, f"{what} checkpoint does not fit {arch}")
    return model


def _convert_detection_checkpoint(
    state_dict: Dict[str, Any], source_name: str, *, semantic_tokens_per_window: Optional[int] = None, **kwargs: Any
) -> nn.Module:
    """The backbone of a released STViT-R COCO detector (mmdetection 2.x: ``backbone.`` keys, the neck and heads
    are left out) -> our ``layout='detection'`` model without a head, computing what the released backbone does.

    Built for any input size (``dynamic_img_size=True``) unless ``img_size`` is given; load it as a feature
    backbone with ``timm.create_model('local-dir:DIR', pretrained=True, features_only=True)``.
    """

    check_family_options(True, kwargs.pop("num_semantic_tokens", None), None)
    if kwargs.get("num_classes"):
        raise InvalidArgumentError("num_classes: a detector's backbone has no classifier")
    backbone = detection_backbone_state_dict(state_dict)
    try:
        args = release_model_args(backbone)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"incomplete STViT-R detector checkpoint (missing {e})") from None
    arch = _release_architecture(args, source_name)
    args.update(layout="detection", num_classes=0, semantic_tokens_per_window=(
        DEFAULT_TOKENS_PER_WINDOW if semantic_tokens_per_window is None else semantic_tokens_per_window))
    if "img_size" not in kwargs:
        args["dynamic_img_size"] = True
    args.update(kwargs)
    model = _build_release_model(arch, args, state_dict, "detector")
    # the weights are the COCO detector's (fine-tuned from the ImageNet release), not the in1k cfg's
    model.pretrained_cfg = dict(model.pretrained_cfg, num_classes=0, tag="coco")
    model.stvit_model_args = _json_args(args)
    return model


def _copy_data_config(source: nn.Module, model: nn.Module) -> None:
    src_cfg = dict(getattr(source, "pretrained_cfg", None) or {})
    cfg = dict(model.pretrained_cfg)
    for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation", "input_size", "label_names", "label_descriptions"):
        if src_cfg.get(key) is not None:
            cfg[key] = src_cfg[key]
    in_chans = getattr(model, "in_chans", None) or model.patch_embed.proj.in_channels
    cfg["input_size"] = (in_chans, *model.patch_embed.img_size)
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = cfg


def convert_pair(
    source: str,
    *,
    num_semantic_tokens: Optional[int] = None,
    pretrained: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    source_kwargs: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> Tuple[nn.Module, nn.Module]:
    """``(source model, STViT model)``: the source ``source`` names (``deit_small``, ``swin_small``, a timm name...)
    with its weights, and its conversion. ``source_kwargs`` shape the source model (``num_classes``, ``img_size``),
    ``kwargs`` the STViT model (``recovery=True`` for STViT-R-DeiT, ``semantic_tokens_per_window`` for Swin).
    Most callers want :func:`stvit_core.load_model`.

    For an official STViT-R release checkpoint the source is the matching timm Swin with random weights on
    the meta device (it only serves as the FLOPs/params baseline).
    """
    name = resolve_source_name(source)
    check_family_options(name.startswith("swin"), num_semantic_tokens, kwargs.get("semantic_tokens_per_window"))
    if checkpoint is not None and name.startswith("swin_"):
        state_dict = load_state_dict_file(checkpoint)
        if is_detector_state_dict(state_dict) and is_release_state_dict(detection_backbone_state_dict(state_dict)):
            model = _convert_detection_checkpoint(state_dict, name, **kwargs, **(source_kwargs or {}))
        elif is_release_state_dict(state_dict):
            model = _convert_release_checkpoint(state_dict, name, **kwargs, **(source_kwargs or {}))
        else:
            model = None
        if model is not None:
            with torch.device("meta"):
                base = timm.create_model(name.split(".")[0], pretrained=False, num_classes=model.num_classes,
                                         img_size=model.patch_embed.img_size)
            return base, model
    src = load_source_model(name, pretrained=pretrained, checkpoint=checkpoint, **(source_kwargs or {}))
    return src, convert_model(src, num_semantic_tokens=num_semantic_tokens, **kwargs)


def conversion_metadata(source: nn.Module, model: nn.Module, *, source_name: str) -> Dict[str, Any]:
    """Facts stored under config.json's ``stvit`` key: source model, tokens, params and GFLOPs of both."""
    input_size = model.pretrained_cfg.get("input_size")
    return {
        "source_model": source_name,
        "architecture": model.pretrained_cfg.get("architecture"),
        "num_semantic_tokens": getattr(model, "num_semantic_tokens", None),
        "semantic_tokens_per_window": getattr(model, "semantic_tokens_per_window", None),
        "params_m": round(count_params(model) / 1e6, 3),
        "gflops": round(count_flops(model, input_size), 4),
        "base_params_m": round(count_params(source) / 1e6, 3),
        "base_gflops": round(count_flops(source, input_size), 4),
        "input_size": list(input_size) if input_size else None,
    }


def default_output_name(model: str, *, num_semantic_tokens: Optional[int] = None,
                        semantic_tokens_per_window: Optional[int] = None, recovery: bool = False) -> str:
    """``stvit-MODEL-tTOKENS`` (DeiT/ViT), ``stvit-r-MODEL-tTOKENS`` (``recovery``), ``stvit-r-MODEL-wTOKENS`` (Swin).

    MODEL is the name as given (``/`` replaced by ``_``); the tokens are the ones the model will have.
    """
    if resolve_source_name(model).startswith("swin"):
        per_window = DEFAULT_TOKENS_PER_WINDOW if semantic_tokens_per_window is None else semantic_tokens_per_window
        return f"stvit-r-{model.replace('/', '_')}-w{per_window}"
    tokens = DEFAULT_TOKENS if num_semantic_tokens is None else num_semantic_tokens
    return f"{'stvit-r' if recovery else 'stvit'}-{model.replace('/', '_')}-t{tokens}"


def convert_to_directory(
    model: str,
    output: Optional[Union[str, os.PathLike]] = None,
    *,
    num_semantic_tokens: Optional[int] = None,
    semantic_tokens_per_window: Optional[int] = None,
    recovery: bool = False,
    pretrained: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    source_kwargs: Optional[Dict[str, Any]] = None,
    force: bool = False,
    **kwargs: Any,
) -> Dict[str, Any]:
    """``stvit convert``: convert ``model`` and save it to ``output`` (default :func:`default_output_name`).

    Every argument is checked before anything is downloaded or written; ``kwargs`` go to the STViT
    architecture. Returns the summary ``stvit convert --json`` prints.
    """
    name = resolve_source_name(model)
    check_family_options(name.startswith("swin"), num_semantic_tokens, semantic_tokens_per_window, recovery)
    output = Path(output) if output is not None else Path(default_output_name(
        model, num_semantic_tokens=num_semantic_tokens, semantic_tokens_per_window=semantic_tokens_per_window,
        recovery=recovery))
    if output.exists() and not force:  # fail before any download or conversion
        raise OutputExistsError(f"{output} already exists (use --force to overwrite)")
    if semantic_tokens_per_window is not None:
        kwargs["semantic_tokens_per_window"] = semantic_tokens_per_window
    if recovery:
        kwargs["recovery"] = True
    source, stvit = convert_pair(name, num_semantic_tokens=num_semantic_tokens, pretrained=pretrained,
                                 checkpoint=checkpoint, source_kwargs=source_kwargs, **kwargs)
    metadata = conversion_metadata(source, stvit, source_name=name)
    metadata["source_weights"] = str(checkpoint) if checkpoint else (f"timm/{name}" if pretrained else "random")
    save_model(stvit, output, force=force, metadata=metadata)
    return {
        "model": metadata["architecture"],
        "source_model": name,
        "tokens": metadata["num_semantic_tokens"],
        "tokens_per_window": metadata["semantic_tokens_per_window"],
        "params_m": metadata["params_m"],
        "base_params_m": metadata["base_params_m"],
        "gflops": metadata["gflops"],
        "base_gflops": metadata["base_gflops"],
        "flops_reduction": round(1 - metadata["gflops"] / metadata["base_gflops"], 4),
        "output": str(output),
    }
