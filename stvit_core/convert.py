"""Source model + weights -> STViT model.

``convert('deit_small', num_semantic_tokens=16)`` builds timm's DeiT-S with its pretrained weights (normal timm /
Hugging Face Hub download), or with a local ``checkpoint`` file, or randomly initialised with
``pretrained=False``, and returns the STViT model carrying every one of its weights (see
:func:`stvit_core.models.deit.checkpoint_filter_fn`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn as nn

from .checkpoint import _one_line, load_state_dict_file
from .errors import CheckpointError, DownloadError, InvalidArgumentError
from .flops import count_flops, count_params

__all__ = [
    "SOURCE_ALIASES",
    "build_source_model",
    "conversion_metadata",
    "convert",
    "convert_model",
    "resolve_source_name",
]

# Short names accepted by the CLI -> the timm model (with pretrained tag) they stand for.
SOURCE_ALIASES: Dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",
    "deit_small": "deit_small_patch16_224.fb_in1k",
    "deit_base": "deit_base_patch16_224.fb_in1k",
}

# Source widths whose STViT architecture has its own registered name (and pretrained config).
_DEIT_ARCHITECTURES = {192: "stvit_deit_tiny_patch16_224", 384: "stvit_deit_small_patch16_224", 768: "stvit_deit_base_patch16_224"}


def resolve_source_name(name: str) -> str:
    """Map a CLI alias or timm name to a timm model name; raise a one-line error for unknown names."""
    import timm

    name = SOURCE_ALIASES.get(name, name)
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise InvalidArgumentError(
            f"unknown model {name!r}: expected {'|'.join(SOURCE_ALIASES)} or a timm DeiT/ViT name"
        )
    return name


def build_source_model(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    **kwargs: Any,
) -> nn.Module:
    """The source model with its weights: a local checkpoint, timm's pretrained weights, or random init."""
    import timm

    name = resolve_source_name(name)
    if checkpoint is not None:
        state_dict = load_state_dict_file(checkpoint)
        model = timm.create_model(name, pretrained=False, **kwargs)
        state_dict = _source_filter(model)(state_dict, model)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{checkpoint} does not fit {name}: {_mismatch_summary(e)}") from None
        return model
    if pretrained:
        if not _weights_cached(name) and not _hub_reachable():
            # fail at once instead of after huggingface_hub's minute of retries
            raise DownloadError(
                f"cannot download pretrained weights for {name}: the Hugging Face Hub is unreachable (offline?); "
                "pass --checkpoint FILE for local weights or --no-pretrained"
            )
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            raise DownloadError(
                f"cannot download pretrained weights for {name} ({_one_line(e)}); "
                "pass --checkpoint FILE for local weights or --no-pretrained"
            ) from None
    return timm.create_model(name, pretrained=False, **kwargs)


def _weights_cached(name: str) -> bool:
    """Whether timm's pretrained weights for ``name`` are already in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        return False
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return True  # not a Hub download (a URL or nothing); let timm decide
    return any(
        isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connect to the Hub endpoint (HF_ENDPOINT honoured); offline mode counts as unreachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _source_filter(model: nn.Module):
    """The checkpoint filter timm uses for ``model``'s family (handles foreign layouts, resampling)."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return lambda sd, m: sd
    return fn


def _mismatch_summary(e: RuntimeError) -> str:
    text = str(e)
    for marker in ("Missing key(s)", "Unexpected key(s)", "size mismatch"):
        idx = text.find(marker)
        if idx >= 0:
            return text[idx:].splitlines()[0].strip()[:300]
    return _one_line(e)


def _vit_model_args(source: nn.Module) -> Tuple[str, Dict[str, Any]]:
    from timm.models.vision_transformer import VisionTransformer

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


def convert_model(source: nn.Module, *, num_semantic_tokens: int = 16, **kwargs: Any) -> nn.Module:
    """An STViT model with every weight of the timm ViT/DeiT ``source`` (see the module docstring).

    Keyword arguments override the STViT architecture (``num_image_blocks``, ``semantic_token_pool``,
    ``global_semantic_tokens``, ``global_pool``...). Preprocessing (mean, std, crop) is the source's.
    """
    import timm

    from .models.deit import checkpoint_filter_fn

    arch, args = _vit_model_args(source)
    if "global_pool" in kwargs and kwargs["global_pool"] != args["global_pool"]:
        # a different readout than the source's: keep the class token only where it is read
        args.pop("class_token")
    args.update(kwargs)
    try:
        model = timm.create_model(arch, pretrained=False, num_semantic_tokens=num_semantic_tokens, **args)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    state_dict = checkpoint_filter_fn(source.state_dict(), model)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if not k.startswith("semantic_token_generator.global_tokens")]:
        raise CheckpointError(f"conversion left weights unmatched: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _copy_data_config(source, model)
    return model


def _copy_data_config(source: nn.Module, model: nn.Module) -> None:
    src_cfg = dict(getattr(source, "pretrained_cfg", None) or {})
    cfg = dict(model.pretrained_cfg)
    for key in ("mean", "std", "crop_pct", "crop_mode", "interpolation", "input_size", "label_names", "label_descriptions"):
        if src_cfg.get(key) is not None:
            cfg[key] = src_cfg[key]
    cfg["input_size"] = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = cfg


def convert(
    source: str = "deit_small",
    *,
    num_semantic_tokens: int = 16,
    pretrained: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    source_kwargs: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the source (``deit_small``, a timm name...) with its weights and convert it to STViT.

    ``source_kwargs`` go to the source model (e.g. ``num_classes``, ``img_size``); ``kwargs`` to the STViT model.
    """
    src = build_source_model(source, pretrained=pretrained, checkpoint=checkpoint, **(source_kwargs or {}))
    return convert_model(src, num_semantic_tokens=num_semantic_tokens, **kwargs)


def conversion_metadata(source: nn.Module, model: nn.Module, *, source_name: str) -> Dict[str, Any]:
    """Facts stored under config.json's ``stvit`` key: source model, tokens, params and GFLOPs of both."""
    input_size = model.pretrained_cfg.get("input_size")
    return {
        "source_model": source_name,
        "architecture": model.pretrained_cfg.get("architecture"),
        "num_semantic_tokens": getattr(model, "num_semantic_tokens", None),
        "params_m": round(count_params(model) / 1e6, 3),
        "gflops": round(count_flops(model, input_size), 4),
        "base_params_m": round(count_params(source) / 1e6, 3),
        "base_gflops": round(count_flops(source, input_size), 4),
        "input_size": list(input_size) if input_size else None,
    }
