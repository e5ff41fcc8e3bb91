"""STViT on DeiT / ViT: image-token blocks, a semantic token generator, then blocks over semantic tokens only.

Layout (paper, Sec. 4.1; same depth as the source model): blocks 1-4 are ordinary ViT blocks over all image
tokens; blocks 5-6 become the two-layer :class:`~stvit_core.layers.SemanticTokenGenerator`; blocks 7-12 run on
``num_semantic_tokens`` tokens (plus the class token). Converting a pretrained DeiT reuses every weight: the
generator's layers start from the source blocks at their depth, their ``qkv`` split into ``q`` and ``kv``.

The model subclasses timm's :class:`~timm.models.vision_transformer.VisionTransformer`, so patch embedding,
position embedding (resampled for other image sizes), head, ``reset_classifier`` and ``pretrained_cfg``
behave as for timm's DeiT.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    checkpoint_seq,
    clean_state_dict,
    generate_default_cfgs,
    named_apply,
    register_model,
)
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ..layers import (
    DUMBBELL_UNIT_DEPTH,
    DumbbellUnit,
    RecoveryBlock,
    SemanticTokenGenerator,
    dumbbell_block_index,
    dumbbell_unit_keys,
    self_to_cross_attention_keys,
    semantic_grid,
    take_indices,
)

__all__ = ["RecoveryVisionTransformer", "SemanticVisionTransformer", "checkpoint_filter_fn", "recovery_checkpoint_filter_fn"]


def _any_size_padding(kwargs: Dict[str, Any]) -> None:
    """``dynamic_img_size=True``: any image size, padded (bottom, right, with zeros) to a multiple of the patch by
    timm's patch embedding unless ``dynamic_img_pad`` says otherwise."""
    if kwargs.get("dynamic_img_size"):
        kwargs.setdefault("dynamic_img_pad", True)


class _TokenMapFeatures:
    """``forward_intermediates`` / ``prune_intermediate_layers`` over the image-token maps of an STViT ViT.

    ``_feature_steps(grid)`` lists the steps whose outputs are full token maps (what ``feature_info`` lists);
    ``_finish(x, grid)`` turns the last map into ``forward_features``' output. Same arguments and meaning as timm's
    ``VisionTransformer.forward_intermediates``. ``grid`` is the image-token grid ``(H, W)`` of this input: the
    one built for, or with ``dynamic_img_size`` the input's (``ceil`` of its size over the patch).
    """

    def _token_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        if self.dynamic_img_size:
            return tuple(self.patch_embed.dynamic_feat_size(x.shape[-2:]))
        return tuple(self.patch_embed.grid_size)

    def _embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _to_maps(self, tokens: List[torch.Tensor], output_fmt: str, return_prefix_tokens: bool,
                 grid: Tuple[int, int]) -> list:
        p = self.num_prefix_tokens
        maps = [y[:, p:] for y in tokens]
        if output_fmt == "NCHW":
            maps = [y.unflatten(1, grid).permute(0, 3, 1, 2).contiguous() for y in maps]
        if return_prefix_tokens and p:
            return list(zip(maps, [y[:, :p] for y in tokens]))
        return maps

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """Image-token maps after the steps in ``feature_info`` and, unless ``intermediates_only``, the final
        features (``forward_features``' output; after ``stop_early`` the final norm of the last map, as timm)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        grid = self._token_grid(x)
        steps = self._feature_steps(grid)
        taken, max_index = take_indices(len(steps), indices)
        x = self._embed_tokens(x)
        run = steps[:max_index + 1] if stop_early or intermediates_only else steps
        intermediates = []
        for i, step in enumerate(run):
            x = checkpoint(step, x) if self.grad_checkpointing and not torch.jit.is_scripting() else step(x)
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        maps = self._to_maps(intermediates, output_fmt, return_prefix_tokens and not output_dict, grid)
        if output_dict:
            out: Dict[str, Any] = {"image_intermediates": maps}
            if return_prefix_tokens and self.num_prefix_tokens:
                out["image_intermediates_prefix"] = [y[:, :self.num_prefix_tokens] for y in intermediates]
            if not intermediates_only:
                out["image_features"] = self._finish(x, grid) if len(run) == len(steps) else self.norm(x)
            return out
        if intermediates_only:
            return maps
        return (self._finish(x, grid) if len(run) == len(steps) else self.norm(x)), maps


class SemanticVisionTransformer(_TokenMapFeatures, VisionTransformer):
    """Vision Transformer whose later blocks run on a few semantic tokens (STViT).

    Args (besides timm's :class:`VisionTransformer` arguments, ``depth`` being the total depth):
        num_semantic_tokens: semantic tokens after the generator; a perfect square (16, 36, 64, 100...) no
            larger than the number of patches.
        num_image_blocks: ordinary blocks over all image tokens before the generator (paper: 4).
        generator_depth: cross-attention layers in the generator (paper: 2).
        semantic_token_pool: ``'max'`` (released code) or ``'avg'`` pooling for the initial semantic tokens.
        global_semantic_tokens: learned global tokens added to the generator's later queries (paper: on).
        global_pool: ``'token'`` reads the class token, ``'avg'`` averages the final semantic tokens (paper).
        class_token: keep a class token; defaults to ``global_pool == 'token'``.

    ``feature_info`` lists the image-token blocks: ``forward_intermediates`` and ``features_only=True`` give
    their maps (stride 16); ``forward_features`` ends on the semantic tokens ``(B, prefix + S, C)``.
    """

    def __init__(
        self,
        num_semantic_tokens: int = 16,
        num_image_blocks: int = 4,
        generator_depth: int = 2,
        semantic_token_pool: str = "max",
        global_semantic_tokens: bool = True,
        global_pool: str = "token",
        class_token: Optional[bool] = None,
        depth: int = 12,
        drop_path_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if class_token is None:
            class_token = global_pool == "token"
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without one")
        num_semantic_blocks = depth - num_image_blocks - generator_depth
        if num_image_blocks < 1 or num_semantic_blocks < 0:
            raise ValueError(
                f"depth {depth} cannot hold {num_image_blocks} image-token blocks and a {generator_depth}-layer generator"
            )
        _any_size_padding(kwargs)
        semantic_grid(num_semantic_tokens)  # validates the square before timm builds anything
        super().__init__(
            global_pool=global_pool,
            class_token=class_token,
            depth=depth,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        self.num_semantic_tokens = num_semantic_tokens
        self.num_image_blocks = num_image_blocks
        self.generator_depth = generator_depth

        # timm built `depth` blocks with the stochastic-depth schedule over the whole depth; keep the ones that stay
        # ordinary blocks and rebuild the generator's positions as cross-attention layers with the same rates.
        blocks = list(self.blocks)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        ref = blocks[0]
        embed_dim = self.embed_dim
        self.blocks = nn.Sequential(*blocks[:num_image_blocks])
        self.semantic_token_generator = SemanticTokenGenerator(
            embed_dim,
            num_heads=ref.attn.num_heads,
            num_semantic_tokens=num_semantic_tokens,
            depth=generator_depth,
            pool=semantic_token_pool,
            global_semantic_tokens=global_semantic_tokens,
            mlp_ratio=ref.mlp.fc1.out_features / embed_dim,
            qkv_bias=ref.attn.qkv.bias is not None,
            drop_path=dpr[num_image_blocks:num_image_blocks + generator_depth],
            init_values=kwargs.get("init_values"),
            norm_layer=partial(nn.LayerNorm, eps=ref.norm1.eps),
            act_layer=type(ref.mlp.act),
            num_prefix_tokens=self.num_prefix_tokens,
            grid_size=self.patch_embed.grid_size,
        )
        self.semantic_blocks = nn.Sequential(*blocks[num_image_blocks + generator_depth:])
        named_apply(init_weights_vit_timm, self.semantic_token_generator)
        if self.semantic_token_generator.global_semantic_tokens is not None:
            trunc_normal_(self.semantic_token_generator.global_semantic_tokens, std=0.02)
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=self.patch_embed.patch_size[0])
            for i in range(num_image_blocks)
        ]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """Depth ordinals for layer-wise lr decay: image blocks, generator layers, then semantic blocks."""
        nb, gd = self.num_image_blocks, self.generator_depth

        def ordinal(name: str) -> float:
            if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "norm_pre")):
                return 0
            for pattern, offset in (
                (r"^blocks\.(\d+)", 1),
                (r"^semantic_token_generator\.layers\.(\d+)", 1 + nb),
                (r"^semantic_blocks\.(\d+)", 1 + nb + gd),
            ):
                m = re.match(pattern, name)
                if m:
                    return offset + int(m.group(1))
            if name.startswith("semantic_token_generator."):  # global tokens, with the first generator layer
                return 1 + nb
            return float("inf")  # final norm and head

        return ordinal

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return super().no_weight_decay() | {"semantic_token_generator.global_semantic_tokens"}

    def set_input_size(self, img_size: Optional[Tuple[int, int]] = None, patch_size: Optional[Tuple[int, int]] = None):
        """timm's (patch grid, position embeddings), and the generator's pooling for the new grid."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        if self.semantic_token_generator is not None:
            self.semantic_token_generator.set_grid_size(self.patch_embed.grid_size)

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def forward_image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding and the image-token blocks: the features before the generator."""
        return self._run(self.blocks, self._embed_tokens(x))

    def _finish(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Image tokens (with prefix) after the image blocks -> the normalised semantic tokens."""
        if self.semantic_token_generator is None:
            raise RuntimeError("this model was pruned to its intermediate layers (prune_intermediate_layers)")
        p = self.num_prefix_tokens
        prefix = x[:, :p] if p else None
        x = self.semantic_token_generator(x[:, p:], grid, prefix, context=x)  # x is concat(prefix, image tokens)
        x = self._run(self.semantic_blocks, x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(self.forward_image_tokens(x), self._token_grid(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _feature_steps(self, grid: Tuple[int, int]) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        return list(self.blocks)

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Keep the image blocks up to the last index; the generator and semantic blocks go (as timm's ViT drops
        its later blocks), so the model then serves ``forward_intermediates(intermediates_only=True)``."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.semantic_token_generator = None
        self.semantic_blocks = nn.Sequential()
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return taken


def _is_stvit_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("semantic_token_generator.", "semantic_blocks.")) for k in state_dict)


def _prepare_vit_state_dict(state_dict: Dict[str, torch.Tensor], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Unwrap, drop DeiT's distillation token, resample pos_embed / patch_embed (timm's ViT filter)."""
    state_dict = state_dict.get("model", state_dict)
    state_dict = clean_state_dict(state_dict.get("state_dict", state_dict))  # DDP / torch.compile prefixes
    if any(k.startswith(("dist_token", "head_dist")) for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("dist_token", "head_dist"))}
        if "pos_embed" in state_dict and model.pos_embed is not None:
            # distilled DeiT has two prefix tokens; keep the class token's position embedding
            pe = state_dict["pos_embed"]
            state_dict["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
    if getattr(model, "cls_token", 0) is None and "cls_token" in state_dict:
        # a class-token source for a model without one (average readout): the token and its position go
        state_dict = {k: v for k, v in state_dict.items() if k != "cls_token"}
        if "pos_embed" in state_dict and not getattr(model, "no_embed_class", False):
            state_dict["pos_embed"] = state_dict["pos_embed"][:, 1:]
    if isinstance(getattr(model, "norm", None), nn.Identity) and "norm.weight" in state_dict \
            and "fc_norm.weight" not in state_dict:
        # a source read out from its class token for an average readout: its final norm becomes the norm after
        # pooling (timm's fc_norm)
        state_dict = {("fc_" + k if k.startswith("norm.") else k): v for k, v in state_dict.items()}
    return vit_checkpoint_filter_fn(state_dict, model)  # resamples pos_embed / patch_embed if needed


def _source_depth(state_dict: Dict[str, torch.Tensor]) -> int:
    return 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SemanticVisionTransformer) -> Dict[str, torch.Tensor]:
    """Convert a timm DeiT/ViT state dict (or pass through an STViT one) to ``model``'s keys.

    Source block ``i`` maps to ``blocks.i`` for ``i < num_image_blocks``, to generator layer
    ``i - num_image_blocks`` (``qkv`` split into ``q`` and ``kv``), then to ``semantic_blocks``. Position
    embeddings are resampled by timm when the image size differs. Global semantic tokens, absent from the
    source, start at zero: the converted generator is then exactly pooling followed by the source blocks'
    attention and MLP weights applied as cross-attention.
    """
    state_dict = _prepare_vit_state_dict(state_dict, model)
    if _is_stvit_state_dict(state_dict):
        return state_dict

    depth = _source_depth(state_dict)
    model_depth = model.num_image_blocks + model.generator_depth + len(model.semantic_blocks)
    if depth and depth != model_depth:
        raise ValueError(f"source model has {depth} blocks, STViT model expects {model_depth}")
    nb, gd = model.num_image_blocks, model.generator_depth
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m is None:
            out[k] = v
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i < nb:
            out[f"blocks.{i}.{rest}"] = v
        elif i < nb + gd:
            out.update(self_to_cross_attention_keys(f"semantic_token_generator.layers.{i - nb}.", rest, v))
        else:
            out[f"semantic_blocks.{i - nb - gd}.{rest}"] = v
    tokens = model.semantic_token_generator.global_semantic_tokens
    if tokens is not None:
        out["semantic_token_generator.global_semantic_tokens"] = torch.zeros_like(tokens)
    return out


def _create_stvit_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> SemanticVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        SemanticVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(source: Optional[str], **kwargs: Any) -> Dict[str, Any]:
    # Pretrained weights are the source DeiT's, converted on load by checkpoint_filter_fn (never fine-tuned).
    return {
        "hf_hub_id": f"timm/{source}" if source else None,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# Tags say what the weights are: DeiT's ImageNet-1k weights (fb_in1k) converted on load, not fine-tuned as STViT.
default_cfgs = generate_default_cfgs(
    {
        "stvit_deit_tiny_patch16_224.fb_in1k_converted": _cfg("deit_tiny_patch16_224.fb_in1k"),
        "stvit_deit_small_patch16_224.fb_in1k_converted": _cfg("deit_small_patch16_224.fb_in1k"),
        "stvit_deit_base_patch16_224.fb_in1k_converted": _cfg("deit_base_patch16_224.fb_in1k"),
        "stvit_vit_patch16_224": _cfg(None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9),
    }
)


@register_model
def stvit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> SemanticVisionTransformer:
    """STViT-DeiT-Tiny: DeiT-T with 16 semantic tokens after block 4 (0.53 GFLOPs vs 1.26).

    ``pretrained=True`` loads DeiT-T's ImageNet-1k weights converted, not fine-tuned as STViT (tag
    ``fb_in1k_converted``): accuracy right after conversion is well below DeiT-T's; fine-tune first.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_stvit_deit("stvit_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> SemanticVisionTransformer:
    """STViT-DeiT-Small: DeiT-S with 16 semantic tokens after block 4 (1.91 GFLOPs vs 4.58).

    ``pretrained=True`` loads DeiT-S's ImageNet-1k weights converted, not fine-tuned as STViT (tag
    ``fb_in1k_converted``): accuracy right after conversion is well below DeiT-S's; fine-tune first.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_stvit_deit("stvit_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> SemanticVisionTransformer:
    """STViT-DeiT-Base: DeiT-B with 16 semantic tokens after block 4 (7.31 GFLOPs vs 17.58).

    ``pretrained=True`` loads DeiT-B's ImageNet-1k weights converted, not fine-tuned as STViT (tag
    ``fb_in1k_converted``): accuracy right after conversion is well below DeiT-B's; fine-tune first.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_stvit_deit("stvit_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_vit_patch16_224(pretrained: bool = False, **kwargs: Any) -> SemanticVisionTransformer:
    """STViT on any plain ViT: give embed_dim, depth, num_heads, patch_size... (used by conversion)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_stvit_deit("stvit_vit_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# STViT-R on DeiT / ViT (beyond the paper): dumbbell units keep the full token map for dense tasks.


_R_SELF_ATTENTION = (0, 3, 4)  # unit positions that stay ViT blocks: the image block and the two semantic blocks


class _SequenceGenerator(SemanticTokenGenerator):
    """The generator on a ViT token sequence ``concat(prefix, image tokens)`` of a fixed patch grid."""

    def forward(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:  # type: ignore[override]
        p = self.num_prefix_tokens
        return super().forward(x[:, p:], grid_size or self.grid_size, x[:, :p] if p else None, context=x)


class _SequenceRecovery(RecoveryBlock):
    """Recovery on a ViT sequence: image tokens read from ``concat(prefix, S)``; the prefix (class token)
    continues from the semantic path, where it was refined with the semantic tokens."""

    def __init__(self, *args: Any, num_prefix_tokens: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, context_index=None) -> torch.Tensor:
        p = self.num_prefix_tokens
        image = super().forward(x[:, p:], context)
        return torch.cat([context[:, :p], image], dim=1) if p else image


class RecoveryVisionTransformer(_TokenMapFeatures, VisionTransformer):
    """STViT-R on ViT/DeiT: the blocks regrouped into dumbbell units that end on the full token map.

    Each unit of 6 blocks is ``[ViT block, generator layer 1, generator layer 2, ViT block, ViT block,
    recovery]`` (DeiT's 12 blocks: 2 units). Semantic tokens are the image tokens max-pooled to
    ``num_semantic_tokens`` (a square grid) and refined by the generator; the class token travels with them.
    ``self.blocks`` is the sequence of units. The full token map exists twice per unit, after its ViT block and
    after its recovery layer: ``feature_info`` lists both (``blocks.U.image_blocks``, ``blocks.U``), so
    ``forward_intermediates`` gives 2 stride-16 maps per unit; ``features_only=True`` defaults to the units'
    outputs. Other input sizes: ``img_size=(H, W)`` (static shapes; ``set_input_size`` rebuilds), or
    ``dynamic_img_size=True`` (any size, padded to a multiple of the patch; position embeddings resampled and the
    token grid pooled per call: still ``num_semantic_tokens`` semantic tokens, each covering more of a larger image).
    """

    def __init__(
        self,
        num_semantic_tokens: int = 16,
        semantic_token_pool: str = "max",
        global_semantic_tokens: bool = True,
        depth: int = 12,
        drop_path_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if depth < DUMBBELL_UNIT_DEPTH or depth % DUMBBELL_UNIT_DEPTH:
            raise ValueError(f"depth {depth} is not a multiple of the 6-block dumbbell unit")
        _any_size_padding(kwargs)
        semantic_grid(num_semantic_tokens)
        super().__init__(depth=depth, drop_path_rate=drop_path_rate, **kwargs)
        self.num_semantic_tokens = num_semantic_tokens
        blocks = list(self.blocks)
        ref = blocks[0]
        dim, heads = self.embed_dim, ref.attn.num_heads
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        common = dict(
            mlp_ratio=ref.mlp.fc1.out_features / dim,
            qkv_bias=ref.attn.qkv.bias is not None,
            init_values=kwargs.get("init_values"),
            norm_layer=partial(nn.LayerNorm, eps=ref.norm1.eps),
            act_layer=type(ref.mlp.act),
        )
        units = []
        for i in range(0, depth, DUMBBELL_UNIT_DEPTH):
            generator = _SequenceGenerator(
                dim, heads, num_semantic_tokens=num_semantic_tokens, depth=2, pool=semantic_token_pool,
                global_semantic_tokens=global_semantic_tokens, drop_path=dpr[i + 1:i + 3],
                num_prefix_tokens=self.num_prefix_tokens, grid_size=self.patch_embed.grid_size, **common,
            )
            recovery = _SequenceRecovery(dim, heads, drop_path=dpr[i + 5], num_prefix_tokens=self.num_prefix_tokens, **common)
            for part in (generator, recovery):
                named_apply(init_weights_vit_timm, part)
            if generator.global_semantic_tokens is not None:
                trunc_normal_(generator.global_semantic_tokens, std=0.02)
            units.append(DumbbellUnit(nn.Sequential(blocks[i]), generator, nn.Sequential(*blocks[i + 3:i + 5]), recovery))
        self.blocks = nn.Sequential(*units)
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [
            dict(module=f"blocks.{u}{part}", num_chs=dim, reduction=reduction)
            for u in range(len(units)) for part in (".image_blocks", "")
        ]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Any:
        """Every part of a unit at the depth of the source block it came from (layer-wise lr decay)."""
        if coarse:
            return super().group_matcher(coarse=True)

        def ordinal(name: str) -> Tuple[float, ...]:
            if re.match(r"^(cls_token|pos_embed|patch_embed|reg_token)", name):
                return (0.0,)
            if name.startswith("norm."):
                return (99999.0,)
            m = re.match(r"^blocks\.(\d+)\.(.*)", name)
            if m:
                return (1.0 + int(m.group(1)) * DUMBBELL_UNIT_DEPTH + dumbbell_block_index(m.group(2)),)
            return (float("inf"),)

        return ordinal

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        tokens = {n for n, _ in self.named_parameters() if n.endswith("global_semantic_tokens")}
        return super().no_weight_decay() | tokens

    def set_input_size(self, img_size: Optional[Tuple[int, int]] = None, patch_size: Optional[Tuple[int, int]] = None):
        """timm's (patch grid, position embeddings), and every generator's pooling for the new grid."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        for unit in self.blocks:
            unit.generator.set_grid_size(self.patch_embed.grid_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # no attention masks: the semantic parts of a unit take none (timm's ViT would pass one to every block)
        grid = self._token_grid(x)
        x = self._embed_tokens(x)
        if self.dynamic_img_size:  # the generators pool this input's grid
            for step in self._feature_steps(grid):
                x = checkpoint(step, x) if self.grad_checkpointing and not torch.jit.is_scripting() else step(x)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _feature_steps(self, grid: Tuple[int, int]) -> List[Callable[[torch.Tensor], torch.Tensor]]:
        if not self.dynamic_img_size:
            return [step for unit in self.blocks for step in (unit.forward_image_blocks, unit.forward_semantic)]
        return [step for unit in self.blocks
                for step in (unit.forward_image_blocks, partial(unit.forward_semantic, grid_size=grid))]

    def _finish(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return self.norm(x)

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Keep the units up to the one holding the last index (a whole unit, even for its first map)."""
        taken, max_index = take_indices(2 * len(self.blocks), indices)
        self.blocks = self.blocks[:max_index // 2 + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return taken


def recovery_checkpoint_filter_fn(
    state_dict: Dict[str, torch.Tensor], model: RecoveryVisionTransformer
) -> Dict[str, torch.Tensor]:
    """A timm DeiT/ViT state dict (or an STViT-R one, passed through) -> ``model``'s keys.

    Source block ``i`` goes to unit ``i // 6``: position 0 stays a ViT block, 1-2 become the generator's
    layers and 5 the recovery layer (``qkv`` split into ``q`` and ``kv``), 3-4 stay ViT blocks over semantic
    tokens (``DUMBBELL_UNIT_PARTS``). Global semantic tokens start at zero, so every converted layer computes
    what the source block did, with the semantic tokens in place of (or as keys for) the image tokens.
    """
    state_dict = _prepare_vit_state_dict(state_dict, model)
    if any(re.match(r"blocks\.\d+\.(image_blocks|generator|semantic_blocks|recovery)\.", k) for k in state_dict):
        return state_dict
    depth, model_depth = _source_depth(state_dict), len(model.blocks) * DUMBBELL_UNIT_DEPTH
    if depth != model_depth:
        raise ValueError(f"source model has {depth} blocks, STViT-R model expects {model_depth}")
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        out.update(dumbbell_unit_keys("blocks.", int(m.group(1)), m.group(2), v, _R_SELF_ATTENTION) if m else {k: v})
    for name, p in model.named_parameters():
        if name.endswith("generator.global_semantic_tokens"):
            out[name] = torch.zeros_like(p)
    return out


def _create_stvit_r_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> RecoveryVisionTransformer:
    depth = kwargs.get("depth", 12)
    out_indices = kwargs.pop("out_indices", tuple(range(1, 2 * (depth // DUMBBELL_UNIT_DEPTH), 2)))  # unit outputs
    return build_model_with_cfg(
        RecoveryVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=recovery_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


default_cfgs.update(generate_default_cfgs(
    {
        "stvit_r_deit_tiny_patch16_224.fb_in1k_converted": _cfg("deit_tiny_patch16_224.fb_in1k"),
        "stvit_r_deit_small_patch16_224.fb_in1k_converted": _cfg("deit_small_patch16_224.fb_in1k"),
        "stvit_r_deit_base_patch16_224.fb_in1k_converted": _cfg("deit_base_patch16_224.fb_in1k"),
        "stvit_r_vit_patch16_224": _cfg(None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9),
    }
))


@register_model
def stvit_r_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> RecoveryVisionTransformer:
    """STViT-R-DeiT-Tiny: DeiT-T as 2 dumbbell units (16 semantic tokens), 14x14 output maps.

    ``pretrained=True`` loads DeiT-T's ImageNet-1k weights converted, not fine-tuned as STViT (tag
    ``fb_in1k_converted``): accuracy right after conversion is well below DeiT-T's; fine-tune first.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_stvit_r_deit("stvit_r_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_r_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> RecoveryVisionTransformer:
    """STViT-R-DeiT-Small: DeiT-S as 2 dumbbell units (16 semantic tokens), 14x14 output maps.

    ``pretrained=True`` loads DeiT-S's ImageNet-1k weights converted, not fine-tuned as STViT (tag
    ``fb_in1k_converted``): accuracy right after conversion is well below DeiT-S's; fine-tune first.
    """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_stvit_r_deit("stvit_r_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_r_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> RecoveryVisionTransformer:
    """STViT-R-DeiT-Base: DeiT-B as 2 dumbbell units (16 semantic tokens), 14x14 output maps.

    ``pretrained=True`` loads DeiT-B's ImageNet-1k weights converted, not fine-tuned as STViT (tag
    ``fb_in1k_converted``): accuracy right after conversion is well below DeiT-B's; fine-tune first.
    """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_stvit_r_deit("stvit_r_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def stvit_r_vit_patch16_224(pretrained: bool = False, **kwargs: Any) -> RecoveryVisionTransformer:
    """STViT-R on any plain ViT (embed_dim, depth a multiple of 6, num_heads...; used by conversion)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_stvit_r_deit("stvit_r_vit_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
