"""STViT-DeiT models: registration, layout, shapes, forward/backward, options, tracing."""

from __future__ import annotations

import pytest
import timm
import torch

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.layers import SemanticTokenGenerator
from stvit_core.models import SemanticVisionTransformer

from .conftest import TINY_VIT

SIZES = ["tiny", "small", "base"]
TOKENS = [16, 36, 64, 100]


def test_models_are_registered_with_timm():
    names = timm.list_models("stvit_deit_*")
    for size in SIZES:
        assert f"stvit_deit_{size}_patch16_224" in names
    assert "stvit_deit_small_patch16_224.fb_in1k_converted" in timm.list_pretrained("stvit_deit_small*")


def test_paper_layout_4_image_blocks_2_generator_layers_6_semantic_blocks():
    model = timm.create_model("stvit_deit_small_patch16_224", num_semantic_tokens=36)
    assert isinstance(model, SemanticVisionTransformer)
    assert len(model.blocks) == 4
    assert isinstance(model.semantic_token_generator, SemanticTokenGenerator)
    assert len(model.semantic_token_generator.layers) == 2
    assert len(model.semantic_blocks) == 6
    assert model.semantic_token_generator.semantic_grid == 6
    assert model.semantic_token_generator.global_semantic_tokens.shape == (1, 36, 384)


def test_semantic_blocks_run_on_semantic_tokens_only():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_semantic_tokens=4).eval()
    seen = []
    model.semantic_blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randn(2, 3, 32, 32))
    assert seen == [torch.Size([2, 1 + 64, 48]), torch.Size([2, 1 + 4, 48])]


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_forward_backward_all_sizes_and_token_counts(size):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    for tokens in TOKENS:
        model = timm.create_model(f"stvit_deit_{size}_patch16_224", num_semantic_tokens=tokens)
        out = model(x)
        assert out.shape == (1, 1000)
        out.sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads), "every parameter must receive a gradient"
        assert model.semantic_token_generator.global_semantic_tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("tokens", [15, 0, 2])
def test_non_square_token_counts_are_rejected(tokens):
    with pytest.raises(ValueError, match="perfect square"):
        timm.create_model("stvit_deit_tiny_patch16_224", num_semantic_tokens=tokens)


def test_more_tokens_than_patches_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        timm.create_model("stvit_deit_tiny_patch16_224", num_semantic_tokens=225)


def test_any_square_up_to_the_patch_count_works():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_semantic_tokens=64).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_semantic_tokens=9).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_other_image_size():
    model = timm.create_model("stvit_deit_tiny_patch16_224", img_size=384).eval()
    assert model.patch_embed.grid_size == (24, 24)
    assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)
    model = timm.create_model("stvit_deit_tiny_patch16_224", img_size=(160, 224)).eval()
    assert model(torch.randn(1, 3, 160, 224)).shape == (1, 1000)


def test_average_readout_has_no_class_token_and_averages_semantic_tokens():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, global_pool="avg").eval()
    assert model.cls_token is None and model.num_prefix_tokens == 0
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 48)
    # timm normalises after pooling for average readouts (fc_norm)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), model.fc_norm(feats.mean(1)))


def test_class_token_readout_reads_the_class_token():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT).eval()
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 17, 48)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])


def test_pooling_and_global_token_options():
    torch.manual_seed(0)
    a = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, semantic_token_pool="max").eval()
    b = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, semantic_token_pool="avg").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))
    c = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, global_semantic_tokens=False)
    assert c.semantic_token_generator.global_semantic_tokens is None
    assert "semantic_token_generator.global_semantic_tokens" not in c.state_dict()
    with pytest.raises(ValueError, match="pooling"):
        timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, semantic_token_pool="median")


def test_generator_position_is_configurable():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_image_blocks=3, num_semantic_tokens=4)
    assert len(model.blocks) == 3 and len(model.semantic_blocks) == 7
    with pytest.raises(ValueError, match="cannot hold"):
        timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_image_blocks=11)


def test_stochastic_depth_schedule_spans_the_whole_depth():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, drop_path_rate=0.11)
    rates = [blk.drop_path1.drop_prob for blk in model.blocks[1:]]
    rates += [layer.drop_path1.drop_prob for layer in model.semantic_token_generator.layers]
    rates += [blk.drop_path1.drop_prob for blk in model.semantic_blocks]
    expected = [0.11 * i / 11 for i in range(1, 12)]
    assert rates == pytest.approx(expected)


def test_layer_decay_groups_follow_depth_order():
    from timm.models import group_parameters

    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT)
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=False)
    ids = {name: gid for gid, names in groups.items() for name in names}
    assert ids["blocks.3.attn.qkv.weight"] < ids["semantic_token_generator.layers.0.attn.q.weight"]
    assert ids["semantic_token_generator.layers.1.attn.kv.weight"] < ids["semantic_blocks.0.attn.qkv.weight"]


def test_fx_trace_matches_eager():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))


def test_meta_device_construction():
    with torch.device("meta"):
        model = timm.create_model("stvit_deit_base_patch16_224", num_semantic_tokens=100)
    assert model.semantic_token_generator.global_semantic_tokens.is_meta


def test_cross_attention_explicit_softmax_path_matches_the_fused_one():
    """timm's fused_attn switch: off, CrossAttention computes the softmax itself (same result)."""
    from stvit_core.layers import CrossAttention

    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT).eval()
    attention = [m for m in model.modules() if isinstance(m, CrossAttention)]
    assert attention and all(m.fused_attn for m in attention)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        for m in attention:
            m.fused_attn = False
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-6)
