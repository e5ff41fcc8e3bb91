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

``layout='detection'`` builds :class:`DetectionSwinTransformer`, the released *detection* backbone
(github.com/changsn/STViT-R-Object-Detection) with the same parameters plus a LayerNorm on each output map: both
generator layers and the recovery layer attend over local neighbourhoods (:mod:`stvit_core.layers.local`), every
Swin block pads its map to whole windows before shifting them and always shifts (mmdetection's Swin), and the
final norm is the last feature norm.

The model subclasses timm's :class:`~timm.models.swin_transformer.SwinTransformer`, its blocks are
:class:`SwinBlock` (timm's, exportable) and stage 3 is a :class:`RecoverySwinStage` with the same NHWC interface, so it follows timm's Swin conventions: ``forward_features``
is NHWC (``output_fmt = 'NHWC'``), ``forward_intermediates`` gives NCHW maps (``output_fmt='NHWC'`` too), and
``features_only=True`` gives the four stage maps (strides 4/8/16/32) NHWC as timm's Swin does, NCHW with
``output_fmt='NCHW'``.

Any input size (``img_size=(H, W)`` or ``dynamic_img_size=True``): the stem pads the image to a multiple of 4
(bottom and right, with zeros, as the released detector does), so a stride-``s`` map has ``ceil(H / s)`` rows;
the Swin blocks pad to whole windows and patch merging pads odd maps, as in timm. In the classification layout
the STGM pools windows of the zero-padded map and takes its keys from the real map only (neighbourhoods
shifted inside the map, recovery and global keys unpadded), so no attention mask is needed and a 224 px input
gives exactly the released computation; the detection layout masks as the released detector does.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
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
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from timm.models.vision_transformer import init_weights_vit_timm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..errors import InvalidArgumentError
from ..layers import (
    DETECTION_NEIGHBOURHOODS,
    DUMBBELL_UNIT_DEPTH,
    CrossAttentionBlock,
    DumbbellUnit,
    GroupedSelfAttentionBlock,
    LocalRecoveryBlock,
    LocalSemanticTokenGenerator,
    RecoveryBlock,
    WindowSemanticTokenGenerator,
    dumbbell_block_index,
    dumbbell_unit_keys,
    semantic_grid,
    take_indices,
    window_grid,
)

__all__ = [
    "RELEASE_PICKLE_GLOBALS",
    "ConvStem",
    "DetectionSwinTransformer",
    "ExportableWindowAttention",
    "PadThenShiftSwinBlock",
    "RecoverySwinStage",
    "RecoverySwinTransformer",
    "SwinBlock",
    "checkpoint_filter_fn",
]

_STEM_STRIDE = 4


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: reads the traced input size
def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW image at the bottom and right to a multiple of ``multiple`` (the released detector's stem)."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def _stem_grid(img_size: Tuple[int, int]) -> Tuple[int, int]:
    return -(-img_size[0] // _STEM_STRIDE), -(-img_size[1] // _STEM_STRIDE)


class ConvStem(nn.Module):
    """The released stem: two 3x3 stride-2 Conv-BN-Hardswish layers (stride 4), NHWC output; :meth:`fuse` folds
    the BatchNorms for inference.

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
            self.grid_size = _stem_grid(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size:
            _check_stem_input(x, self.img_size)
        return self.proj(_pad_to_multiple(x, _STEM_STRIDE)).permute(0, 2, 3, 1)

    @torch.no_grad()
    def fuse(self) -> "ConvStem":
        """timm's reparameterisation hook (``timm.utils.reparameterize_model``): fold each BatchNorm into its
        convolution once, for inference (the same function within float rounding). Returns ``self``; a second
        call does nothing. On CPU the folded stem runs in ~0.6x the time: no BatchNorm passes over
        full-resolution maps, channels-last weights make the convolutions emit the NHWC output (no copy after
        the permute), and the activations run in place on the convolutions' fresh outputs (at 800x1333 a second
        51 MB map per layer would be fresh pages to fault in)."""
        if isinstance(self.proj[1], nn.BatchNorm2d):
            layers: List[nn.Module] = []
            for conv, bn in ((self.proj[0], self.proj[1]), (self.proj[3], self.proj[4])):
                folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                   device="meta")  # parameters assigned below: no init, no random draw
                folded.weight, folded.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
                layers += [folded, nn.Hardswish(inplace=True)]
            self.proj = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        return self


class PaddedPatchEmbed(PatchEmbed):
    """timm's patch embedding that zero-pads the image to a multiple of the patch (bottom, right): any size, a
    ``ceil(H / 4) x ceil(W / 4)`` grid, as the conv stem."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["dynamic_img_pad"] = True
        super().__init__(*args, **kwargs)

    def _init_img_size(self, img_size: Union[int, Tuple[int, int]]):
        img_size, _, _ = super()._init_img_size(img_size)
        if img_size is None:
            return None, None, None
        grid = tuple(-(-s // p) for s, p in zip(img_size, self.patch_size))
        return img_size, grid, grid[0] * grid[1]


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: reads the traced input size
def _check_stem_input(x: torch.Tensor, img_size: Tuple[int, int]) -> None:
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(
            f"input size {tuple(x.shape[-2:])} does not match the model's {tuple(img_size)} "
            "(build it with img_size=(H, W) or dynamic_img_size=True)"
        )


class ExportableWindowAttention(WindowAttention):
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


class SwinBlock(SwinTransformerBlock):
    """timm's Swin block with :class:`ExportableWindowAttention`; ``fused_attn`` picks its SDPA path."""

    def __init__(self, dim: int, input_resolution: Union[int, Tuple[int, int]], num_heads: int = 4,
                 head_dim: Optional[int] = None, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 fused_attn: bool = True, device: Any = None, dtype: Any = None, **kwargs: Any) -> None:
        super().__init__(dim, input_resolution, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop, device=device, dtype=dtype, **kwargs)
        self.attn = ExportableWindowAttention(dim, num_heads, head_dim, self.window_size, qkv_bias, attn_drop,
                                              proj_drop, device=device, dtype=dtype)
        self.attn.fused_attn = fused_attn

    @classmethod
    def from_block(cls, block: SwinTransformerBlock, **kwargs: Any) -> "SwinBlock":
        """``block`` (built by timm's Swin) as this class: constructed on the meta device (no init, no random
        draw) with ``block``'s arguments, then given its parameters and buffers (the same tensors)."""
        attn = block.attn
        new = cls(
            block.dim, block.input_resolution, num_heads=attn.num_heads,
            head_dim=attn.qkv.out_features // 3 // attn.num_heads, window_size=block.window_size,
            shift_size=block.target_shift_size, always_partition=block.always_partition,
            dynamic_mask=block.dynamic_mask, mlp_ratio=block.mlp_ratio, qkv_bias=attn.qkv.bias is not None,
            proj_drop=attn.proj_drop.p, attn_drop=attn.attn_drop.p,
            drop_path=getattr(block.drop_path1, "drop_prob", 0.0), act_layer=type(block.mlp.act),
            norm_layer=partial(type(block.norm1), eps=block.norm1.eps), device="meta", **kwargs,
        )
        for name, tensor in (*block.named_parameters(), *block.named_buffers()):
            module, _, attr = name.rpartition(".")
            setattr(new.get_submodule(module), attr, tensor)
        return new


class PadThenShiftSwinBlock(SwinBlock):
    """timm's Swin block with mmdetection's order (that of the released detector): pad the map to whole windows,
    then shift them. timm shifts first and pads after; the two differ where the map is not whole windows."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pad_h, pad_w = -H % self.window_size[0], -W % self.window_size[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_area, C)
        mask = self.get_attn_mask(x) if self.dynamic_mask else self.attn_mask
        windows = self.attn(windows, mask=mask).view(-1, self.window_size[0], self.window_size[1], C)
        x = window_reverse(windows, self.window_size, Hp, Wp)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


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
            if isinstance(unit.recovery, LocalRecoveryBlock):
                unit.recovery.set_grid_size(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.units, x)
        return self.units(x)


def _check_semantic_args(tokens_per_window: int, window_size: Any, semantic_stage: int, depths: Sequence[int],
                         stem: str) -> None:
    if stem not in ("conv", "patch"):
        raise ValueError(f"stem must be 'conv' or 'patch', got {stem!r}")
    if not isinstance(window_size, int):
        raise ValueError(f"window_size must be one int for all stages, got {window_size!r}")
    try:
        side = semantic_grid(tokens_per_window)
    except ValueError:
        raise InvalidArgumentError(f"{{semantic_tokens_per_window}} must be a perfect square (4, 9, 16...), got "
                                   f"{tokens_per_window}", semantic_tokens_per_window=tokens_per_window) from None
    if side > window_size:
        raise InvalidArgumentError(f"{{semantic_tokens_per_window=}}: that many semantic tokens do not fit a "
                                   f"{window_size}x{window_size} window", semantic_tokens_per_window=tokens_per_window)
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
        detection_neighbourhoods: taken by :class:`DetectionSwinTransformer` only (refused here).
        init_values: LayerScale init of the STViT layers (released: 1e-5).
        semantic_token_pool: ``'max'`` (released) or ``'avg'``.
        fused_attn: run the Swin blocks' window attention through ``scaled_dot_product_attention``.

    The registered models build this class for ``layout='classification'`` (the default) and
    :class:`DetectionSwinTransformer` for ``layout='detection'``; ``self.layout`` says which.
    """

    layout = "classification"
    _block_cls = SwinBlock

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        semantic_tokens_per_window: int = 9,
        semantic_stage: int = 2,
        stem: str = "conv",
        global_semantic_tokens: bool = False,
        neighbourhood_size: Optional[int] = None,
        detection_neighbourhoods: Optional[Sequence[int]] = None,
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
        _check_semantic_args(semantic_tokens_per_window, window_size, semantic_stage, depths, stem)
        self._check_layout_args(global_semantic_tokens, neighbourhood_size, detection_neighbourhoods,
                                semantic_token_pool)
        super().__init__(
            img_size=img_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate, norm_layer=norm_layer,
            embed_layer=ConvStem if stem == "conv" else PaddedPatchEmbed, **kwargs,
        )
        self.semantic_tokens_per_window = semantic_tokens_per_window
        self.semantic_stage = semantic_stage
        self.stem = stem
        self.feature_dim = -1  # timm's mark for NHWC features (channels last), as its sequencer models
        for stage in self.layers:  # timm builds its own block class; ours, with the same tensors
            stage.blocks = nn.Sequential(*(self._block_cls.from_block(b, fused_attn=fused_attn) for b in stage.blocks))
        old = self.layers[semantic_stage]
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)[semantic_stage]
        ln = partial(nn.LayerNorm, eps=1e-5) if norm_layer is nn.LayerNorm else norm_layer
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                      init_values=init_values, norm_layer=ln)
        generator_args = dict(window_size=window_size, tokens_per_window=semantic_tokens_per_window,
                              grid_size=old.output_resolution, dynamic_size=self.dynamic_img_size)
        dim, heads = int(embed_dim * 2 ** semantic_stage), num_heads[semantic_stage]
        units = []
        for i in range(0, depths[semantic_stage], DUMBBELL_UNIT_DEPTH):
            generator, recovery = self._generator_and_recovery(
                dim, heads, dpr[i:i + 6], generator_args, common,
                global_semantic_tokens=global_semantic_tokens and i == 0,  # released: first unit only
                neighbourhood_size=neighbourhood_size, pool=semantic_token_pool,
                detection_neighbourhoods=detection_neighbourhoods)
            units.append(_dumbbell_unit(old.blocks[i], generator, recovery, dim, heads, dpr[i:i + 6], common))
        self.layers[semantic_stage] = RecoverySwinStage(old.downsample, units)

    @staticmethod
    def _check_layout_args(global_semantic_tokens: bool, neighbourhood_size: Optional[int],
                           detection_neighbourhoods: Optional[Sequence[int]], pool: str) -> None:
        """Each layout takes its own options: the other's are refused, never ignored."""
        if detection_neighbourhoods is not None:
            raise ValueError("detection_neighbourhoods applies to layout='detection' only (use neighbourhood_size)")

    @staticmethod
    def _generator_and_recovery(dim: int, heads: int, dpr: Sequence[float], generator_args: Dict[str, Any],
                                common: Dict[str, Any], global_semantic_tokens: bool, neighbourhood_size: Optional[int],
                                pool: str, detection_neighbourhoods: Optional[Sequence[int]]) -> Tuple[nn.Module, nn.Module]:
        """A unit's window generator (global STGM layer over the whole map) and recovery of the NHWC map."""
        generator = WindowSemanticTokenGenerator(
            dim, heads, depth=2, global_semantic_tokens=global_semantic_tokens, drop_path=dpr[1:3],
            neighbourhood_size=neighbourhood_size, pool=pool, **generator_args, **common)
        return generator, RecoveryBlock(dim, heads, input_fmt="NHWC", drop_path=dpr[5], **common)

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
            m = re.match(r"^feature_norms\.(\d+)", name)
            if m:  # the detection layout's: with the stage whose map it normalises, after its blocks
                return (1.0, float(m.group(1)), 99999.0)
            return (float("inf"),)

        return ordinal

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        nwd = super().no_weight_decay()
        return nwd | {n for n, _ in self.named_parameters() if n.endswith("global_semantic_tokens")}

    def set_input_size(self, img_size=None, patch_size=None, window_size=None, window_ratio=None, always_partition=None):
        """As timm's, but windows keep their size (the semantic stage's pooling is tied to it)."""
        if window_size is None and window_ratio is None:
            window_size = [w[0] for w in self._ref_window_sizes]
        super().set_input_size(img_size, patch_size, window_size, window_ratio, always_partition)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.patch_embed(x)))

    def _output_map(self, i: int, x: torch.Tensor, norm: bool) -> torch.Tensor:
        """Stage ``i``'s output as ``forward_intermediates`` returns it (NHWC)."""
        return self.norm(x) if norm and i == len(self.layers) - 1 else x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's Swin ``forward_intermediates``: stage maps NCHW (``output_fmt='NHWC'``: as the stages produce
        them), final features NHWC; ``norm=True`` puts the final norm on the last stage's map."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        taken, max_index = take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        x = self.patch_embed(x)
        maps = []
        for i, stage in enumerate(self.layers[:max_index + 1] if stop_early else self.layers):
            x = stage(x)
            if i in taken:
                y = self._output_map(i, x, norm)
                maps.append(y if output_fmt == "NHWC" else y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return maps
        return (self._final_norm(x) if i == last else x), maps

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map -> ``forward_features``' output (the final norm)."""
        return self.norm(x)


class DetectionSwinTransformer(RecoverySwinTransformer):
    """STViT-R-Swin in the layout of the released *detection* backbone (``layout='detection'``).

    The classification model's parameters plus a LayerNorm on each output map (``feature_norms``, the release's
    ``norm0``-``norm3``; the last is the final norm): both generator layers and the recovery layer attend over
    local neighbourhoods (:mod:`stvit_core.layers.local`), every Swin block pads its map to whole windows before
    shifting them and always shifts (mmdetection's Swin, 7x7 windows and shifts in every stage whatever its
    size). ``detection_neighbourhoods``: sides of the neighbourhoods of generator layers 1 and 2 (image tokens)
    and of the recovery layer (semantic tokens); released: (14, 21, 27). Global semantic tokens,
    ``neighbourhood_size`` and average pooling are refused (the release has none of them).
    """

    layout = "detection"
    _block_cls = PadThenShiftSwinBlock

    def __init__(self, *args: Any, norm_layer: Any = nn.LayerNorm, **kwargs: Any) -> None:
        kwargs.setdefault("always_partition", True)
        super().__init__(*args, norm_layer=norm_layer, **kwargs)
        ln = partial(nn.LayerNorm, eps=1e-5) if norm_layer is nn.LayerNorm else norm_layer
        self.feature_norms = nn.ModuleList(ln(info["num_chs"]) for info in self.feature_info)
        self.norm = nn.Identity()

    @staticmethod
    def _check_layout_args(global_semantic_tokens: bool, neighbourhood_size: Optional[int],
                           detection_neighbourhoods: Optional[Sequence[int]], pool: str) -> None:
        refused = [name for name, bad in (("global_semantic_tokens", global_semantic_tokens),
                                          ("neighbourhood_size", neighbourhood_size is not None),
                                          ("semantic_token_pool='avg'", pool != "max")) if bad]
        if refused:
            raise ValueError(f"{', '.join(refused)} does not apply to layout='detection' (the released detector "
                             "has no global tokens, max-pools, and takes detection_neighbourhoods)")
        if detection_neighbourhoods is not None and len(tuple(detection_neighbourhoods)) != 3:
            raise ValueError("detection_neighbourhoods takes three sides (generator layers 1 and 2, recovery), "
                             f"got {detection_neighbourhoods!r}")

    @staticmethod
    def _generator_and_recovery(dim: int, heads: int, dpr: Sequence[float], generator_args: Dict[str, Any],
                                common: Dict[str, Any], global_semantic_tokens: bool, neighbourhood_size: Optional[int],
                                pool: str, detection_neighbourhoods: Optional[Sequence[int]]) -> Tuple[nn.Module, nn.Module]:
        """The local generator and recovery, with the release's padding masks."""
        sides = tuple(detection_neighbourhoods or DETECTION_NEIGHBOURHOODS)
        generator = LocalSemanticTokenGenerator(dim, heads, neighbourhood_sizes=sides[:2], drop_path=dpr[1:3],
                                                **generator_args, **common)
        recovery = LocalRecoveryBlock(dim, heads, neighbourhood_size=sides[2], drop_path=dpr[5], **generator_args,
                                      **common)
        return generator, recovery

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._final_norm(self.layers(self.patch_embed(x)))

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_norms[len(self.layers) - 1](x)

    def _output_map(self, i: int, x: torch.Tensor, norm: bool) -> torch.Tensor:
        return self.feature_norms[i](x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """As the classification layout's, but every map goes through its own feature norm (the released
        backbone's outputs), so ``norm`` does not apply."""
        if norm:
            raise ValueError("norm=True does not apply to the detection layout: every map has its feature norm")
        return super().forward_intermediates(x, indices, False, stop_early, output_fmt, intermediates_only)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's, plus the feature norms of the stages that go."""
        taken = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        self.feature_norms = self.feature_norms[:len(self.layers)]
        return taken


#: the registered models' ``layout`` argument: the class each layout builds
LAYOUTS = {"classification": RecoverySwinTransformer, "detection": DetectionSwinTransformer}

#: What the released STViT-R .pth files pickle besides tensors, for ``torch.serialization.safe_globals``: their
#: training config, a yacs ``CfgNode`` (a dict subclass, read as a plain ``OrderedDict``, never executed), and sets.
RELEASE_PICKLE_GLOBALS = [(OrderedDict, "yacs.config.CfgNode"), set]


def _dumbbell_unit(image_block: nn.Module, generator: nn.Module, recovery: nn.Module, dim: int, heads: int,
                   dpr: Sequence[float], common: Dict[str, Any]) -> DumbbellUnit:
    """One unit of the semantic stage: the (unshifted) Swin block, the generator, local and global semantic
    attention, the recovery; the new layers initialised as timm's ViT."""
    semantic_blocks = nn.Sequential(
        GroupedSelfAttentionBlock(dim, heads, group_size=generator.tokens_per_window, drop_path=dpr[3], **common),
        CrossAttentionBlock(dim, heads, drop_path=dpr[4], **common),
    )
    for part in (generator, semantic_blocks, recovery):
        named_apply(init_weights_vit_timm, part)
    return DumbbellUnit(nn.Sequential(image_block), generator, semantic_blocks, recovery)


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


def is_detector_state_dict(state_dict: Dict[str, Any]) -> bool:
    """True for a whole mmdetection detector (``backbone.``, ``neck.``, heads): the released COCO checkpoints."""
    return any(k.startswith("backbone.layers.") for k in state_dict)


def detection_backbone_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A detector's backbone weights (keys under ``backbone.``, or a backbone's own), its output norms
    ``norm0``-``norm3`` named ``feature_norms.0``..."""
    if is_detector_state_dict(state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return {re.sub(r"^norm(\d+)\.", r"feature_norms.\1.", k): v for k, v in state_dict.items()}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RecoverySwinTransformer) -> Dict[str, torch.Tensor]:
    """Convert a Swin state dict to ``model``'s keys; every key of ``model`` is returned.

    * our own format: passed through;
    * the official STViT-R release (``{'model': ...}``, downsample at stage ends, ``layer_scale_1``, conv stem
      ``proj.0.c``): renamed one to one;
    * the released COCO detectors (mmdetection: ``{'state_dict': ...}`` with the backbone under ``backbone.``):
      the backbone, renamed as the release, its output norms ``norm0``-``norm3`` to ``feature_norms`` (a
      ``layout='detection'`` model; the neck and heads are left out);
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
    state_dict = detection_backbone_state_dict(clean_state_dict(state_dict))  # DDP / torch.compile prefixes
    if not is_swin_state_dict(state_dict):
        raise ValueError("not a Swin checkpoint (no 'layers.N.blocks' weights)")
    if not isinstance(model, DetectionSwinTransformer) and any(k.startswith("feature_norms.") for k in state_dict):
        raise ValueError("a detection backbone (output norms norm0-norm3) loads into layout='detection' only")
    if any(re.match(r"layers\.\d+\.units\.", k) for k in state_dict):
        return _other_layout(state_dict, model)
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


def _other_layout(state_dict: Dict[str, torch.Tensor], model: RecoverySwinTransformer) -> Dict[str, torch.Tensor]:
    """Our own format, for either layout: the classification model's final norm has no place in the detection
    layout (whose feature norms start at identity, as the released detector's did from the ImageNet weights)."""
    if not isinstance(model, DetectionSwinTransformer):
        return state_dict
    out = {k: v for k, v in state_dict.items() if not k.startswith("norm.")}
    for k, v in model.state_dict().items():
        if k.startswith("feature_norms.") and k not in out:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# Registration


def _feature_cfg(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """timm's Swin features (stage outputs, NHWC); ``output_fmt='NCHW'`` asks for NCHW maps, which come from
    ``forward_intermediates`` (timm's ``feature_cls='getter'``), as do the detection layout's normalised maps."""
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
    if kwargs.get("features_only") and kwargs.get("layout") == "detection":
        cfg["feature_cls"] = "getter"
        if "feature_cls" not in kwargs:  # NHWC as the classification layout's maps; asked for a getter: its NCHW
            cfg.setdefault("output_fmt", "NHWC")
    return cfg


def _create_stvit_r_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> RecoverySwinTransformer:
    feature_cfg = _feature_cfg(kwargs)
    layout = kwargs.pop("layout", "classification")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    # the released .pth files pickle their training config next to the weights: timm's weights-only loader
    # reads it through RELEASE_PICKLE_GLOBALS, nothing else is allowed
    with torch.serialization.safe_globals(RELEASE_PICKLE_GLOBALS):
        return build_model_with_cfg(
            LAYOUTS[layout],
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


# The authors' ImageNet-1k weights (trained from scratch as STViT-R, 82.7% / 83.2% top-1), downloaded from their Hub
# repository and converted on load by checkpoint_filter_fn; evaluated as Swin (resize 256, centre crop 224).
_RELEASE_HUB_ID = "csncsn/STViT-R"
default_cfgs = generate_default_cfgs(
    {
        "stvit_r_swin_tiny_patch4_window7_224": _cfg(),  # not released
        "stvit_r_swin_small_patch4_window7_224.in1k": _cfg(
            hf_hub_id=_RELEASE_HUB_ID, hf_hub_filename="STViT-R-Swin-S.pth", crop_pct=0.875),
        "stvit_r_swin_base_patch4_window7_224.in1k": _cfg(
            hf_hub_id=_RELEASE_HUB_ID, hf_hub_filename="STViT-R-Swin-B.pth", crop_pct=0.875),
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
