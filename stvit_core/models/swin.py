"""STViT-R on Swin: stage 3 made of dumbbell units over local semantic tokens, stages 1, 2, 4 standard Swin.

Layout (the released STViT-R code, github.com/changsn/STViT-R): stage 3 (14x14 tokens at 224 px) is cut into
units of six blocks, ``[Swin block, STGM local, STGM global, semantic local, semantic global, recovery]``
(Swin-S/B: 3 units, Swin-T: 1). The local STGM pools every 7x7 window to ``semantic_tokens_per_window``
tokens (4, 9 or 16), which attend to a 10x10 neighbourhood of image tokens around their window; the global
STGM layer attends to ``concat(S, X)``; the semantic layers attend within each window's tokens, then over all
of them; recovery rebuilds the 14x14 map (queries: the image tokens, keys/values: the semantic tokens).
The STViT layers have separate ``q``/``kv`` projections, LayerScale (1e-5 at init) and no relative position
bias, as released. The release replaces Swin's patch embedding by a convolutional stem (``stem='conv'``);
``stem='patch'`` keeps Swin's, for conversion from timm's pretrained Swin.

The model subclasses timm's :class:`~timm.models.swin_transformer.SwinTransformer` and swaps stage 3 for a
:class:`SemanticSwinStage` with the same NHWC interface, so ``forward_features``, ``forward_intermediates``,
``features_only=True`` (four NCHW maps, strides 4/8/16/32), the head and ``pretrained_cfg`` are timm's.

Other input sizes (multiples of 32; build with ``img_size=(H, W)`` or ``dynamic_img_size=True``): the Swin
blocks pad to whole windows as in timm; the STGM pools windows of the zero-padded map, and its keys are
taken from the real map only (neighbourhoods shifted inside the map, recovery and global keys unpadded), so
no attention mask is needed and a 224 px input gives exactly the released computation.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, calculate_drop_path_rates, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import init_weights_vit_timm

from ..layers import (
    CrossAttentionBlock,
    DumbbellUnit,
    GroupedSelfAttentionBlock,
    RecoveryBlock,
    WindowSemanticTokenGenerator,
    self_to_cross_attention_keys,
    semantic_grid_size,
    window_grid,
)

__all__ = ["ConvStem", "SemanticSwinStage", "SemanticSwinTransformer", "checkpoint_filter_fn"]

UNIT_DEPTH = 6  # Swin block, 2 generator layers, 2 semantic layers, recovery
_IMG_MULTIPLE = 32


class ConvStem(nn.Module):
    """The released stem: two 3x3 stride-2 Conv-BN-Hardswish layers (stride 4), NHWC output.

    Accepts timm's ``PatchEmbed`` constructor arguments so it drops into :class:`SwinTransformer`.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        strict_img_size: bool = True,
        **kwargs: Any,  # norm_layer, output_fmt: the released stem has no norm and emits NHWC
    ) -> None:
        super().__init__()
        if to_2tuple(patch_size) != (4, 4):
            raise ValueError(f"the convolutional stem has stride 4, got patch_size={patch_size}")
        self.patch_size = (4, 4)
        self.strict_img_size = strict_img_size
        self.set_input_size(img_size)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(embed_dim // 2),
            nn.Hardswish(),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.Hardswish(),
        )

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None, patch_size: Any = None) -> None:
        if img_size is not None:
            self.img_size = to_2tuple(img_size)
            self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size} "
                "(build it with img_size=(H, W) or dynamic_img_size=True)"
            )
        return self.proj(x).permute(0, 2, 3, 1)


class SemanticSwinStage(nn.Module):
    """A Swin stage whose blocks are dumbbell units: PatchMerging, then ``depth // 6`` units, NHWC in and out."""

    def __init__(self, downsample: nn.Module, units: Sequence[DumbbellUnit]) -> None:
        super().__init__()
        self.downsample = downsample
        self.units = nn.Sequential(*units)
        self.grad_checkpointing = False

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Any, always_partition: Optional[bool] = None):
        window = to_2tuple(window_size)
        for unit in self.units:
            if window != (unit.generator.window_size,) * 2:
                raise ValueError(
                    f"the semantic stage keeps its {unit.generator.window_size}x{unit.generator.window_size} "
                    f"windows, got {window}"
                )
            feat = tuple((i + 1) // 2 for i in feat_size) if not isinstance(self.downsample, nn.Identity) else feat_size
            for block in unit.image_blocks:
                block.set_input_size(feat_size=feat, window_size=window, always_partition=always_partition)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.units, x)
        return self.units(x)


def _check_img_size(img_size: Tuple[int, int]) -> None:
    if img_size[0] % _IMG_MULTIPLE or img_size[1] % _IMG_MULTIPLE:
        raise ValueError(f"image height and width must be multiples of {_IMG_MULTIPLE}, got {img_size[0]}x{img_size[1]}")


class SemanticSwinTransformer(SwinTransformer):
    """STViT-R-Swin: timm's Swin with one stage (stage 3 by default) made of dumbbell units.

    Args (besides timm's :class:`SwinTransformer` arguments):
        semantic_tokens_per_window: 4, 9 (released) or 16 semantic tokens per window (any square that fits).
        semantic_stage: index of the stage made of dumbbell units (2 = stage 3); its depth must be a multiple
            of 6.
        stem: ``'conv'`` (released convolutional stem) or ``'patch'`` (Swin's patch embedding).
        global_semantic_tokens: learned global tokens added to the first unit's global STGM queries (off in
            the release; tied to ``img_size``).
        neighbourhood_size: side of the image-token neighbourhood a window's semantic tokens attend to in the
            local STGM (default window + 3 = 10, as released).
        init_values: LayerScale init of the STViT layers (released: 1e-5).
        semantic_token_pool: ``'max'`` (released) or ``'avg'``.
        fused_attn: run the Swin blocks' window attention through ``scaled_dot_product_attention``.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        semantic_tokens_per_window: int = 9,
        semantic_stage: int = 2,
        stem: str = "conv",
        global_semantic_tokens: bool = False,
        neighbourhood_size: Optional[int] = None,
        init_values: Optional[float] = 1e-5,
        semantic_token_pool: str = "max",
        fused_attn: bool = True,
        depths: Tuple[int, ...] = (2, 2, 6, 2),
        num_heads: Tuple[int, ...] = (3, 6, 12, 24),
        embed_dim: int = 96,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        norm_layer: Any = nn.LayerNorm,
        **kwargs: Any,
    ) -> None:
        img_size = to_2tuple(img_size)
        _check_img_size(img_size)
        if stem not in ("conv", "patch"):
            raise ValueError(f"stem must be 'conv' or 'patch', got {stem!r}")
        if not isinstance(window_size, int):
            raise ValueError(f"window_size must be one int for all stages, got {window_size!r}")
        try:
            side = semantic_grid_size(semantic_tokens_per_window)
        except ValueError:
            raise ValueError(
                f"semantic_tokens_per_window must be a perfect square (4, 9, 16...), got {semantic_tokens_per_window}"
            ) from None
        if side > window_size:
            raise ValueError(
                f"{semantic_tokens_per_window} semantic tokens per window do not fit a {window_size}x{window_size} window"
            )
        if not 0 <= semantic_stage < len(depths):
            raise ValueError(f"semantic_stage {semantic_stage} is not one of the {len(depths)} stages")
        stage_depth = depths[semantic_stage]
        if stage_depth < UNIT_DEPTH or stage_depth % UNIT_DEPTH:
            raise ValueError(f"stage {semantic_stage + 1} has depth {stage_depth}; dumbbell units need a multiple of 6")
        super().__init__(
            img_size=img_size,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            norm_layer=norm_layer,
            embed_layer=ConvStem if stem == "conv" else PatchEmbed,
            **kwargs,
        )
        self.semantic_tokens_per_window = semantic_tokens_per_window
        self.semantic_stage = semantic_stage
        self.stem = stem

        old = self.layers[semantic_stage]
        dim = int(embed_dim * 2 ** semantic_stage)
        heads = num_heads[semantic_stage]
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)[semantic_stage]
        norm = partial(nn.LayerNorm, eps=1e-5) if norm_layer is nn.LayerNorm else norm_layer
        stage_grid = old.output_resolution
        nh, nw = window_grid(stage_grid, window_size)
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                      init_values=init_values, norm_layer=norm)
        units = []
        for u in range(stage_depth // UNIT_DEPTH):
            i = u * UNIT_DEPTH
            image_block = old.blocks[i]  # even index: timm built it without shift, as released
            generator = WindowSemanticTokenGenerator(
                dim, heads, window_size=window_size, tokens_per_window=semantic_tokens_per_window,
                neighbourhood_size=neighbourhood_size, depth=2, pool=semantic_token_pool,
                global_tokens=global_semantic_tokens and u == 0,  # released: only the first unit adds them
                num_windows=nh * nw, drop_path=dpr[i + 1:i + 3], **common,
            )
            semantic_blocks = nn.Sequential(
                GroupedSelfAttentionBlock(dim, heads, group_size=semantic_tokens_per_window, drop_path=dpr[i + 3], **common),
                CrossAttentionBlock(dim, heads, drop_path=dpr[i + 4], **common),
            )
            recovery = RecoveryBlock(dim, heads, drop_path=dpr[i + 5], **common)
            for part in (generator, semantic_blocks, recovery):
                named_apply(init_weights_vit_timm, part)
            units.append(DumbbellUnit(nn.Sequential(image_block), generator, semantic_blocks, recovery))
        self.layers[semantic_stage] = SemanticSwinStage(old.downsample, units)
        if fused_attn:
            for m in self.modules():
                if isinstance(m, WindowAttention):
                    m.fused_attn = True

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Any:
        """timm's Swin grouping; inside the semantic stage every part of a unit is ordered at the depth of the
        Swin block it replaces, so layer-wise lr decay sees the same depth as for Swin."""
        if coarse:
            return super().group_matcher(coarse=True)
        s = self.semantic_stage

        def ordinal(name: str) -> Tuple[float, ...]:
            if name.startswith("patch_embed"):
                return (0.0,)
            if name.startswith("norm"):
                return (1.0, 99999.0)
            m = re.match(rf"^layers\.{s}\.units\.(\d+)\.(\w+)\.(?:layers\.)?(\d+)?", name)
            if m:
                offset = {"image_blocks": 0, "generator": 1, "semantic_blocks": 3, "recovery": 5}[m.group(2)]
                sub = int(m.group(3)) if m.group(3) and m.group(2) != "recovery" else 0
                return (1.0, float(s), float(int(m.group(1)) * UNIT_DEPTH + offset + sub))
            m = re.match(r"^layers\.(\d+)\.(?:downsample|blocks\.(\d+))", name)
            if m:
                return (1.0, float(m.group(1)), float(m.group(2) or 0))
            return (float("inf"),)

        return ordinal

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        nwd = super().no_weight_decay()
        return nwd | {n for n, _ in self.named_parameters() if n.endswith("global_tokens")}

    def set_input_size(self, img_size=None, patch_size=None, window_size=None, window_ratio=None, always_partition=None):
        """As timm's, but windows keep their size (the semantic stage's pooling is tied to it)."""
        if img_size is not None:
            _check_img_size(to_2tuple(img_size))
        if window_size is None and window_ratio is None:
            window_size = [w[0] for w in self._ref_window_sizes]
        super().set_input_size(img_size, patch_size, window_size, window_ratio, always_partition)

    def _check_input(self, x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        if H % _IMG_MULTIPLE or W % _IMG_MULTIPLE:
            raise ValueError(f"input height and width must be multiples of {_IMG_MULTIPLE}, got {H}x{W}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        self._check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint conversion: timm / Microsoft Swin, the official STViT-R release, our own format.

_UNIT_PARTS = ("image_blocks.0", "generator.layers.0", "generator.layers.1",
               "semantic_blocks.0", "semantic_blocks.1", "recovery")


def is_release_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True for the official STViT-R-Swin release (STViT blocks with ``layer_scale_1`` and ``attn.q``)."""
    return any(re.match(r"layers\.\d+\.blocks\.\d+\.layer_scale_1$", k) for k in state_dict) and any(
        re.match(r"layers\.\d+\.blocks\.\d+\.attn\.q\.weight$", k) for k in state_dict
    )


def is_swin_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True for a Swin-family state dict (timm, Microsoft or STViT-R release layout)."""
    return any(re.match(r"layers\.\d+\.blocks\.\d+\.", k) for k in state_dict) or any(
        re.match(r"layers\.\d+\.units\.\d+\.", k) for k in state_dict
    )


def _timm_layout(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Microsoft/release layout -> timm's: downsample at the start of the next stage, ``head.fc``; no buffers."""
    old_layout = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue  # buffers, rebuilt by the model
        if old_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


def _release_stem(k: str) -> str:
    for src, dst in (("proj.0.c.", "proj.0."), ("proj.0.bn.", "proj.1."), ("proj.2.c.", "proj.3."), ("proj.2.bn.", "proj.4.")):
        if k.startswith("patch_embed." + src):
            return "patch_embed." + dst + k[len("patch_embed." + src):]
    return k


def _to_window_major(tokens: torch.Tensor, model: SemanticSwinTransformer) -> torch.Tensor:
    """Release global tokens are ordered row-major over the semantic grid; ours window by window."""
    stage = model.layers[model.semantic_stage]
    gen = stage.units[0].generator
    nh, nw = window_grid(stage.units[0].image_blocks[0].input_resolution, gen.window_size)
    s = gen.side
    C = tokens.shape[-1]
    return tokens.reshape(1, nh, s, nw, s, C).permute(0, 1, 3, 2, 4, 5).reshape(1, -1, C)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SemanticSwinTransformer) -> Dict[str, torch.Tensor]:
    """Convert a Swin state dict to ``model``'s keys; every key of ``model`` is returned.

    * our own format: passed through;
    * the official STViT-R release (``{'model': ...}``, downsample at stage ends, ``layer_scale_1``, conv stem
      ``proj.0.c``): renamed one to one;
    * timm's or Microsoft's Swin: stages 1, 2, 4, the patch embedding (``stem='patch'``), each unit's Swin
      block and the head are copied; the STViT layers of stage 3 take the attention (``qkv`` split into ``q``
      and ``kv``), MLP and norms of the Swin block at their depth, their LayerScale starts at 1 (the source
      block's scale) and relative position bias is dropped (the STViT layers have none). Weights without a
      source (the conv stem when converting to ``stem='conv'``, global tokens) keep ``model``'s init.

    Raises ValueError when the state dict is not a Swin of ``model``'s depth.
    """
    if not isinstance(state_dict, dict):
        raise ValueError("checkpoint is not a state dict")
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if not is_swin_state_dict(state_dict):
        raise ValueError("not a Swin checkpoint (no 'layers.N.blocks' weights)")
    target = model.state_dict()
    if any(re.match(r"layers\.\d+\.units\.", k) for k in state_dict):
        return state_dict
    release = is_release_state_dict(state_dict)
    state_dict = _timm_layout(state_dict)
    s = model.semantic_stage
    stage_depth = len(model.layers[s].units) * UNIT_DEPTH
    depths = [1 + max([int(m.group(2)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k))
                       and int(m.group(1)) == i] or [-1]) for i in range(len(model.layers))]
    expected = [len(layer.blocks) if i != s else stage_depth for i, layer in enumerate(model.layers)]
    if depths != expected:
        raise ValueError(f"checkpoint stage depths {tuple(depths)} do not match the model's {tuple(expected)}")

    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if release:
            k = _release_stem(k)
            k = k.replace(".layer_scale_1", ".ls1.gamma").replace(".layer_scale_2", ".ls2.gamma")
            if k == f"layers.{s}.semantic_token2":
                out[f"layers.{s}.units.0.generator.global_tokens"] = _to_window_major(v, model)
                continue
        m = re.match(rf"layers\.{s}\.blocks\.(\d+)\.(.*)", k)
        if m is None:
            if k in target:
                out[k] = v
            continue
        j, rest = int(m.group(1)), m.group(2)
        part = _UNIT_PARTS[j % UNIT_DEPTH]
        prefix = f"layers.{s}.units.{j // UNIT_DEPTH}.{part}."
        if part != "image_blocks.0":
            if rest.startswith("attn.relative_position_bias_table"):
                continue  # STViT layers have no relative position bias
            out.update(self_to_cross_attention_keys(prefix, rest, v))
            continue
        out[prefix + rest] = v
    for k, v in target.items():
        if k not in out:
            # no source weight: LayerScale starts at the source block's scale 1, anything else keeps its init
            out[k] = torch.ones_like(v) if k.endswith(("ls1.gamma", "ls2.gamma")) and not release else v
    unknown = [k for k in out if k not in target]
    if unknown:
        raise ValueError(f"checkpoint does not fit this model: unexpected weights such as {unknown[0]!r}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Registration


def _create_stvit_r_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> SemanticSwinTransformer:
    depths = kwargs.get("depths", (2, 2, 6, 2))
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    return build_model_with_cfg(
        SemanticSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        # No weights download here: the official release (csncsn/STViT-R on the Hugging Face Hub) is converted
        # from its file with `stvit convert swin_small --checkpoint STViT-R-Swin-S.pth --output DIR`.
        "stvit_r_swin_tiny_patch4_window7_224": _cfg(),
        "stvit_r_swin_small_patch4_window7_224": _cfg(),
        "stvit_r_swin_base_patch4_window7_224": _cfg(),
    }
)


@register_model
def stvit_r_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SemanticSwinTransformer:
    """STViT-R-Swin-T: Swin-T whose stage 3 is one dumbbell unit (9 tokens per window: 3.43 GFLOPs vs 4.5)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_stvit_r_swin("stvit_r_swin_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_r_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SemanticSwinTransformer:
    """STViT-R-Swin-S: Swin-S whose stage 3 is three dumbbell units (released: 5.83 GFLOPs vs 8.7)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_stvit_r_swin("stvit_r_swin_small_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_r_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SemanticSwinTransformer:
    """STViT-R-Swin-B: Swin-B whose stage 3 is three dumbbell units (released: 10.26 GFLOPs vs 15.4)."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7)
    return _create_stvit_r_swin("stvit_r_swin_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))
