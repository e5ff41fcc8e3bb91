"""Conversion from timm DeiT/ViT: every weight reused bit for bit, same features up to the generator."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import stvit_core
from stvit_core import load_model
from stvit_core.convert import convert_model

from .conftest import TINY_VIT


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **TINY_VIT).eval()


def expected_target_key(key: str, embed_dim: int):
    """The paper's mapping written out independently of the implementation: (target key, row slice)."""
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    if m is None:
        return [(key, slice(None))]
    i, rest = int(m.group(1)), m.group(2)
    if i < 4:
        return [(key, slice(None))]
    if i < 6:
        prefix = f"semantic_token_generator.layers.{i - 4}."
        if rest.startswith("attn.qkv."):
            kind = rest.split(".")[-1]
            return [(prefix + "attn.q." + kind, slice(0, embed_dim)), (prefix + "attn.kv." + kind, slice(embed_dim, None))]
        return [(prefix + rest, slice(None))]
    return [(f"semantic_blocks.{i - 6}.{rest}", slice(None))]


def test_every_source_weight_is_kept_bit_for_bit(source):
    model = convert_model(source, num_semantic_tokens=16)
    target = model.state_dict()
    used = set()
    for key, value in source.state_dict().items():
        for tkey, rows in expected_target_key(key, source.embed_dim):
            assert torch.equal(target[tkey], value[rows]), key
            used.add(tkey)
    new = set(target) - used
    assert new == {"semantic_token_generator.global_semantic_tokens"}
    # documented behaviour: global tokens start at zero in a converted model
    assert torch.count_nonzero(target["semantic_token_generator.global_semantic_tokens"]) == 0


def test_features_up_to_the_generator_equal_the_source(source):
    model = convert_model(source, num_semantic_tokens=16).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        src = source.blocks[:4](source.norm_pre(source._pos_embed(source.patch_embed(x))))
        ours = model.forward_image_tokens(x)
    assert torch.equal(src, ours)


def test_class_token_in_the_first_generator_layer_computes_what_source_block_5_did(source):
    """The class token attends to [cls, image tokens] with block 5's weights, exactly as in the source."""
    model = convert_model(source, num_semantic_tokens=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_image_tokens(x)
        expected_cls = source.blocks[4](feats)[:, 0]
        out = model.semantic_token_generator.layers[0](
            torch.cat([feats[:, :1], feats[:, 1:17]], 1), feats
        )
    torch.testing.assert_close(out[:, 0], expected_cls, rtol=1e-5, atol=1e-5)


def test_with_one_semantic_token_per_patch_generator_layer_1_equals_source_block_5(source):
    """64 tokens on the 8x8 grid: pooling is the identity, so layer 1 is block 5 over all tokens."""
    model = convert_model(source, num_semantic_tokens=64).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_image_tokens(x)
        expected = source.blocks[4](feats)
        generator = model.semantic_token_generator
        del generator.layers[1:]  # stop after layer 1
        out = generator(feats[:, 1:], model.patch_embed.grid_size, feats[:, :1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_num_classes_and_image_size_are_inherited():
    src = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=7)
    model = convert_model(src, num_semantic_tokens=16)
    assert model.num_classes == 7
    assert model.patch_embed.grid_size == (8, 8)
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 64, 64)


def test_timm_pretrained_path_converts_deit_weights(tiny_vit_checkpoint):
    """timm.create_model('stvit_deit_tiny...', pretrained=True) loads DeiT weights through our filter."""
    model = timm.create_model(
        "stvit_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(tiny_vit_checkpoint))
    )
    src = torch.load(tiny_vit_checkpoint, weights_only=True)["model"]
    assert torch.equal(model.semantic_blocks[5].mlp.fc2.weight, src["blocks.11.mlp.fc2.weight"])
    assert torch.equal(model.semantic_token_generator.layers[1].attn.kv.weight, src["blocks.5.attn.qkv.weight"][192:])


def test_vit_with_other_width_converts_to_generic_architecture():
    src = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, num_heads=2, depth=8)
    model = convert_model(src, num_semantic_tokens=4, num_image_blocks=3)
    assert model.pretrained_cfg["architecture"] == "stvit_vit_patch16_224"
    assert len(model.blocks) == 3 and len(model.semantic_blocks) == 3


def test_non_vit_source_is_rejected():
    src = timm.create_model("resnet18")
    with pytest.raises(stvit_core.StvitError, match="DeiT/ViT"):
        convert_model(src)


def test_convert_with_local_checkpoint(tiny_vit_checkpoint):
    model = load_model("deit_tiny", convert=True, checkpoint=tiny_vit_checkpoint, num_semantic_tokens=36)
    src = torch.load(tiny_vit_checkpoint, weights_only=True)["model"]
    assert torch.equal(model.pos_embed, src["pos_embed"])
    assert torch.equal(model.head.weight, src["head.weight"])
    assert model.num_semantic_tokens == 36


@pytest.mark.parametrize("recovery", [False, True])
def test_average_readout_from_a_class_token_source(source, recovery):
    """--readout avg on DeiT: no class token, its position embedding dropped, the final norm after pooling."""
    model = convert_model(source, num_semantic_tokens=4, global_pool="avg", recovery=recovery).eval()
    assert model.global_pool == "avg"
    src = source.state_dict()
    ours = model.state_dict()
    assert "norm.weight" not in ours
    if recovery:  # STViT-R-DeiT keeps its class token as a token (not read out)
        torch.testing.assert_close(ours["cls_token"], src["cls_token"], rtol=0, atol=0)
        torch.testing.assert_close(ours["pos_embed"], src["pos_embed"], rtol=0, atol=0)
    else:
        assert model.cls_token is None and model.num_prefix_tokens == 0 and "cls_token" not in ours
        torch.testing.assert_close(ours["pos_embed"], src["pos_embed"][:, 1:], rtol=0, atol=0)
    for name in ("weight", "bias"):
        torch.testing.assert_close(ours[f"fc_norm.{name}"], src[f"norm.{name}"], rtol=0, atol=0)
    first_block = "blocks.0.image_blocks.0" if recovery else "blocks.0"
    torch.testing.assert_close(ours[f"{first_block}.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
