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
:class:`RecoverySwinStage` with the same NHWC interface, so it follows timm's Swin conventions: ``forward_features``
is NHWC (``output_fmt = 'NHWC'``), ``forward_intermediates`` gives NCHW maps (``output_fmt='NHWC'`` too), and
``features_only=True`` gives the four stage maps (strides 4/8/16/32) NHWC as timm's Swin does, NCHW with
``output_fmt='NCHW'``.

Other input sizes (multiples of 32; build with ``img_size=(H, W)`` or ``dynamic_img_size=True``): the Swin
blocks pad to whole windows as in timm; the STGM pools windows of the zero-padded map, and its keys are
taken from the real map only (neighbourhoods shifted inside the map, recovery and global keys unpadded), so
no attention mask is needed and a 224 px input gives exactly the released computation.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, calculate_drop_path_rates, to_2tuple
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    clean_state_dict,
    generate_default_cfgs,
    named_apply,
    register_model,
    register_notrace_function,
)
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from timm.models.vision_transformer import init_weights_vit_timm

from ..layers import (
    DUMBBELL_UNIT_DEPTH,
    CrossAttentionBlock,
    DumbbellUnit,
    GroupedSelfAttentionBlock,
    RecoveryBlock,
    WindowSemanticTokenGenerator,
    dumbbell_block_index,
    dumbbell_unit_keys,
    semantic_grid,
    window_grid,
)

__all__ = [
    "ConvStem",
    "RecoverySwinStage",
    "RecoverySwinTransformer",
    "SemanticSwinStage",
    "SemanticSwinTransformer",
    "checkpoint_filter_fn",
]

UNIT_DEPTH = DUMBBELL_UNIT_DEPTH  # deprecated name (0.x releases)
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
        if self.strict_img_size:
            _check_stem_input(x, self.img_size)
        return self.proj(x).permute(0, 2, 3, 1)


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: reads the traced input size
def _check_stem_input(x: torch.Tensor, img_size: Tuple[int, int]) -> None:
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f"input size {tuple(x.shape[-2:])} does not match the model's {tuple(img_size)} "
            "(build it with img_size=(H, W) or dynamic_img_size=True)"
        )


class _ExportableWindowAttention(WindowAttention):
    """timm's window attention, whose fused path gives way to its explicit-softmax path under ``torch.export``.

    Why: the ONNX exporter decomposes SDPA-with-a-bias differently from how it was traced, and the reshape after
    it fails ("Cannot view a tensor with shape [B*nW, 49, heads, d]"; timm's own Swin with ``fused_attn`` on
    fails the same way, torch 2.14, pytorch/pytorch#139508). Eager and ``torch.compile`` keep the fused kernel.
    """

    @property
    def fused_attn(self) -> bool:
        return self._fused_attn and not torch.compiler.is_exporting()

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self._fused_attn = value


def _exportable_window_attention(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.__dict__.pop("fused_attn", None)  # timm's instance attribute; the property replaces it
            module.__class__ = _ExportableWindowAttention
            module.fused_attn = fused


class RecoverySwinStage(nn.Module):
    """A Swin stage whose blocks are dumbbell units: PatchMerging, then ``depth // 6`` units, NHWC in and out."""

    def __init__(self, downsample: nn.Module, units: Sequence[DumbbellUnit]) -> None:
        super().__init__()
        self.downsample = downsample
        self.units = nn.Sequential(*units)
        self.grad_checkpointing = False

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Any, always_partition: Optional[bool] = None):
        """timm's stage interface: the units' Swin blocks and generators are rebuilt for the new map."""
        window = to_2tuple(window_size)
        feat = feat_size if isinstance(self.downsample, nn.Identity) else tuple((i + 1) // 2 for i in feat_size)
        for unit in self.units:
            if window != (unit.generator.window_size,) * 2:
                raise ValueError(
                    f"the semantic stage keeps its {unit.generator.window_size}x{unit.generator.window_size} "
                    f"windows, got {window}"
                )
            for block in unit.image_blocks:
                block.set_input_size(feat_size=feat, window_size=window, always_partition=always_partition)
            unit.generator.set_grid_size(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.units, x)
        return self.units(x)


def _check_img_size(img_size: Tuple[int, int]) -> None:
    if img_size[0] % _IMG_MULTIPLE or img_size[1] % _IMG_MULTIPLE:
        raise ValueError(f"image height and width must be multiples of {_IMG_MULTIPLE}, got {img_size[0]}x{img_size[1]}")


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: reads the traced input size
def _check_input_size(x: torch.Tensor) -> None:
    H, W = x.shape[-2:]
    if H % _IMG_MULTIPLE or W % _IMG_MULTIPLE:
        raise ValueError(f"input height and width must be multiples of {_IMG_MULTIPLE}, got {H}x{W}")


def _check_semantic_args(tokens_per_window: int, window_size: Any, semantic_stage: int, depths: Sequence[int],
                         stem: str) -> None:
    if stem not in ("conv", "patch"):
        raise ValueError(f"stem must be 'conv' or 'patch', got {stem!r}")
    if not isinstance(window_size, int):
        raise ValueError(f"window_size must be one int for all stages, got {window_size!r}")
    try:
        side = semantic_grid(tokens_per_window)
    except ValueError:
        raise ValueError(
            f"semantic_tokens_per_window must be a perfect square (4, 9, 16...), got {tokens_per_window}"
        ) from None
    if side > window_size:
        raise ValueError(f"{tokens_per_window} semantic tokens per window do not fit a {window_size}x{window_size} window")
    if not 0 <= semantic_stage < len(depths):
        raise ValueError(f"semantic_stage {semantic_stage} is not one of the {len(depths)} stages")
    if depths[semantic_stage] < DUMBBELL_UNIT_DEPTH or depths[semantic_stage] % DUMBBELL_UNIT_DEPTH:
        raise ValueError(f"stage {semantic_stage + 1} has depth {depths[semantic_stage]}; dumbbell units need a "
                         "multiple of 6")


class RecoverySwinTransformer(SwinTransformer):
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
        _check_semantic_args(semantic_tokens_per_window, window_size, semantic_stage, depths, stem)
        super().__init__(
            img_size=img_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate, norm_layer=norm_layer,
            embed_layer=ConvStem if stem == "conv" else PatchEmbed, **kwargs,
        )
        self.semantic_tokens_per_window = semantic_tokens_per_window
        self.semantic_stage = semantic_stage
        self.stem = stem
        self.feature_dim = -1  # timm's mark for NHWC features (channels last), as its sequencer models
        old = self.layers[semantic_stage]
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)[semantic_stage]
        common = dict(
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            init_values=init_values,
            norm_layer=partial(nn.LayerNorm, eps=1e-5) if norm_layer is nn.LayerNorm else norm_layer,
        )
        generator_args = dict(
            window_size=window_size, tokens_per_window=semantic_tokens_per_window,
            neighbourhood_size=neighbourhood_size, pool=semantic_token_pool, grid_size=old.output_resolution,
            dynamic_size=self.dynamic_img_size,
        )
        units = [
            _dumbbell_unit(old.blocks[i], int(embed_dim * 2 ** semantic_stage), num_heads[semantic_stage], dpr[i:i + 6],
                           global_semantic_tokens and i == 0, generator_args, common)  # released: first unit only
            for i in range(0, depths[semantic_stage], DUMBBELL_UNIT_DEPTH)
        ]
        self.layers[semantic_stage] = RecoverySwinStage(old.downsample, units)
        _exportable_window_attention(self, fused_attn)

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
            m = re.match(rf"^layers\.{s}\.units\.(\d+)\.(.*)", name)
            if m:
                return (1.0, float(s), float(int(m.group(1)) * DUMBBELL_UNIT_DEPTH + dumbbell_block_index(m.group(2))))
            m = re.match(r"^layers\.(\d+)\.(?:downsample|blocks\.(\d+))", name)
            if m:
                return (1.0, float(m.group(1)), float(m.group(2) or 0))
            return (float("inf"),)

        return ordinal

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        nwd = super().no_weight_decay()
        return nwd | {n for n, _ in self.named_parameters() if n.endswith("global_semantic_tokens")}

    def set_input_size(self, img_size=None, patch_size=None, window_size=None, window_ratio=None, always_partition=None):
        """As timm's, but windows keep their size (the semantic stage's pooling is tied to it)."""
        if img_size is not None:
            _check_img_size(to_2tuple(img_size))
        if window_size is None and window_ratio is None:
            window_size = [w[0] for w in self._ref_window_sizes]
        super().set_input_size(img_size, patch_size, window_size, window_ratio, always_partition)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input_size(x)
        return super().forward_features(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's Swin ``forward_intermediates`` (NCHW maps, final features NHWC); ``output_fmt='NHWC'`` gives
        the stage maps as the stages produce them."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        _check_input_size(x)
        out = super().forward_intermediates(x, indices, norm, stop_early, "NCHW", intermediates_only)
        if output_fmt == "NHWC":
            maps = [m.permute(0, 2, 3, 1) for m in (out if intermediates_only else out[1])]
            return maps if intermediates_only else (out[0], maps)
        return out


def _dumbbell_unit(image_block: nn.Module, dim: int, heads: int, dpr: Sequence[float], global_semantic_tokens: bool,
                   generator_args: Dict[str, Any], common: Dict[str, Any]) -> DumbbellUnit:
    """One unit of the semantic stage: timm's (unshifted) Swin block, the window generator, local and global
    semantic attention, recovery of the NHWC map; the new layers initialised as timm's ViT."""
    generator = WindowSemanticTokenGenerator(
        dim, heads, depth=2, global_semantic_tokens=global_semantic_tokens, drop_path=dpr[1:3], **generator_args,
        **common,
    )
    semantic_blocks = nn.Sequential(
        GroupedSelfAttentionBlock(dim, heads, group_size=generator.tokens_per_window, drop_path=dpr[3], **common),
        CrossAttentionBlock(dim, heads, drop_path=dpr[4], **common),
    )
    recovery = RecoveryBlock(dim, heads, input_fmt="NHWC", drop_path=dpr[5], **common)
    for part in (generator, semantic_blocks, recovery):
        named_apply(init_weights_vit_timm, part)
    return DumbbellUnit(nn.Sequential(image_block), generator, semantic_blocks, recovery)


# deprecated names (0.x releases): the model is STViT-R, like RecoveryVisionTransformer
SemanticSwinTransformer = RecoverySwinTransformer
SemanticSwinStage = RecoverySwinStage


# ----------------------------------------------------------------------------------------------------------
# Checkpoint conversion: timm / Microsoft Swin, the official STViT-R release, our own format.


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
    """Microsoft/release layout -> timm's key names, without a model (for reading a release's shapes; the
    checkpoint filter uses timm's own Swin filter, which needs the model)."""
    old_layout = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if old_layout:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


_RELEASE_STEM = (
    ("proj.0.c.", "proj.0."), ("proj.0.bn.", "proj.1."), ("proj.2.c.", "proj.3."), ("proj.2.bn.", "proj.4."),
)


def _release_key(k: str) -> str:
    """The release's conv stem and LayerScale names -> ours."""
    for src, dst in _RELEASE_STEM:
        if k.startswith("patch_embed." + src):
            return "patch_embed." + dst + k[len("patch_embed." + src):]
    return k.replace(".layer_scale_1", ".ls1.gamma").replace(".layer_scale_2", ".ls2.gamma")


def _to_window_major(tokens: torch.Tensor, model: RecoverySwinTransformer) -> torch.Tensor:
    """Release global tokens are ordered row-major over the semantic grid; ours window by window."""
    gen = model.layers[model.semantic_stage].units[0].generator
    nh, nw = window_grid(gen.grid_size, gen.window_size)
    s, C = gen.semantic_grid, tokens.shape[-1]
    return tokens.reshape(1, nh, s, nw, s, C).permute(0, 1, 3, 2, 4, 5).reshape(1, -1, C)


def _check_stage_depths(state_dict: Dict[str, torch.Tensor], model: RecoverySwinTransformer) -> None:
    s = model.semantic_stage
    found = [1 + max([int(m.group(2)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k))
                      and int(m.group(1)) == i] or [-1]) for i in range(len(model.layers))]
    expected = [len(layer.blocks) if i != s else len(layer.units) * DUMBBELL_UNIT_DEPTH
                for i, layer in enumerate(model.layers)]
    if found != expected:
        raise ValueError(f"checkpoint stage depths {tuple(found)} do not match the model's {tuple(expected)}")


def _units_from_blocks(state_dict: Dict[str, torch.Tensor], model: RecoverySwinTransformer,
                       release: bool) -> Dict[str, torch.Tensor]:
    """Stage ``s``'s blocks -> its units (``DUMBBELL_UNIT_PARTS``); the STViT layers take no relative position
    bias; the release's names become ours. Other keys are left for timm's Swin filter."""
    s = model.semantic_stage
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if release:
            k = _release_key(k)
            if k == f"layers.{s}.semantic_token2":
                out[f"layers.{s}.units.0.generator.global_semantic_tokens"] = _to_window_major(v, model)
                continue
        elif k.startswith("patch_embed.") and model.stem == "conv":
            continue  # Swin's patch embedding has no place in the conv stem (which keeps its init)
        m = re.match(rf"layers\.{s}\.blocks\.(\d+)\.(.*)", k)
        if m is None:
            out[k] = v
        elif int(m.group(1)) % DUMBBELL_UNIT_DEPTH == 0 or not m.group(2).startswith("attn.relative_position"):
            out.update(dumbbell_unit_keys(f"layers.{s}.units.", int(m.group(1)), m.group(2), v))
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RecoverySwinTransformer) -> Dict[str, torch.Tensor]:
    """Convert a Swin state dict to ``model``'s keys; every key of ``model`` is returned.

    * our own format: passed through (files with the 0.x name ``global_tokens`` load too);
    * the official STViT-R release (``{'model': ...}``, downsample at stage ends, ``layer_scale_1``, conv stem
      ``proj.0.c``): renamed one to one;
    * timm's or Microsoft's Swin: stages 1, 2, 4, the patch embedding (``stem='patch'``), each unit's Swin
      block and the head are copied; the STViT layers of stage 3 take the attention (``qkv`` split into ``q``
      and ``kv``), MLP and norms of the Swin block at their depth, their LayerScale starts at 1 (the source
      block's scale) and relative position bias is dropped (the STViT layers have none). Weights without a
      source (the conv stem when converting to ``stem='conv'``, global tokens) keep ``model``'s init.

    The Microsoft layout, buffers and window/patch resampling are timm's Swin ``checkpoint_filter_fn``.
    Raises ValueError when the state dict is not a Swin of ``model``'s depth.
    """
    if not isinstance(state_dict, dict):
        raise ValueError("checkpoint is not a state dict")
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    state_dict = clean_state_dict(state_dict)  # DDP / torch.compile prefixes
    if not is_swin_state_dict(state_dict):
        raise ValueError("not a Swin checkpoint (no 'layers.N.blocks' weights)")
    if any(re.match(r"layers\.\d+\.units\.", k) for k in state_dict):
        return state_dict
    _check_stage_depths(state_dict, model)
    release = is_release_state_dict(state_dict)
    converted = swin_checkpoint_filter_fn(_units_from_blocks(state_dict, model, release), model)
    target = model.state_dict()
    unit_prefix = f"layers.{model.semantic_stage}.units."
    out = {k: v for k, v in converted.items() if k in target or k.startswith(unit_prefix)}
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


def _feature_cfg(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """timm's Swin features (stage outputs, NHWC); ``output_fmt='NCHW'`` asks for NCHW maps, which come from
    ``forward_intermediates`` (timm's ``feature_cls='getter'``)."""
    depths = kwargs.get("depths", (2, 2, 6, 2))
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    cfg: Dict[str, Any] = dict(flatten_sequential=True, out_indices=out_indices)
    if kwargs.get("features_only") and "output_fmt" in kwargs:
        output_fmt = kwargs.pop("output_fmt")
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        cfg["output_fmt"] = output_fmt
        if output_fmt == "NCHW":
            cfg["feature_cls"] = "getter"
    return cfg


def _create_stvit_r_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> RecoverySwinTransformer:
    feature_cfg = _feature_cfg(kwargs)
    return build_model_with_cfg(
        RecoverySwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg,
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
def stvit_r_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> RecoverySwinTransformer:
    """STViT-R-Swin-T: Swin-T whose stage 3 is one dumbbell unit (9 tokens per window: 3.43 GFLOPs vs 4.5)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_stvit_r_swin("stvit_r_swin_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_r_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> RecoverySwinTransformer:
    """STViT-R-Swin-S: Swin-S whose stage 3 is three dumbbell units (released: 5.83 GFLOPs vs 8.7)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)
    return _create_stvit_r_swin("stvit_r_swin_small_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_r_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> RecoverySwinTransformer:
    """STViT-R-Swin-B: Swin-B whose stage 3 is three dumbbell units (released: 10.26 GFLOPs vs 15.4)."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7)
    return _create_stvit_r_swin("stvit_r_swin_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))
