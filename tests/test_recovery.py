"""STViT-R on DeiT: dumbbell units over the ViT blocks keep a 14x14 map; conversion keeps every weight."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.convert import convert_model
from stvit_core.flops import count_flops
from stvit_core.models.deit import RecoveryVisionTransformer

from .conftest import assert_one_line_error, run_cli

SMALL = dict(embed_dim=64, num_heads=2, num_classes=10)


def test_conversion_keeps_every_weight():
    torch.manual_seed(0)
    src = timm.create_model("deit_small_patch16_224", **SMALL)
    model = convert_model(src, num_semantic_tokens=16, recovery=True)
    assert isinstance(model, RecoveryVisionTransformer) and len(model.blocks) == 2
    s, t = src.state_dict(), model.state_dict()
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"):
        assert torch.equal(s[k], t[k])
    dim = 64
    parts = ["image_blocks.0", "generator.layers.0", "generator.layers.1", "semantic_blocks.0",
             "semantic_blocks.1", "recovery"]
    for i in range(12):
        src_block, dst = f"blocks.{i}.", f"blocks.{i // 6}.{parts[i % 6]}."
        if parts[i % 6].startswith(("generator", "recovery")):
            assert torch.equal(t[dst + "attn.q.weight"], s[src_block + "attn.qkv.weight"][:dim])
            assert torch.equal(t[dst + "attn.kv.bias"], s[src_block + "attn.qkv.bias"][dim:])
        else:
            assert torch.equal(t[dst + "attn.qkv.weight"], s[src_block + "attn.qkv.weight"])
        for k in ("norm1.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.bias", "norm2.bias"):
            assert torch.equal(t[dst + k], s[src_block + k]), dst + k
    # global tokens start at zero, so nothing but the source's weights shapes the converted model
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if n.endswith("global_semantic_tokens"))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_feature_maps_stride_16_and_backward():
    net = timm.create_model("stvit_r_deit_small_patch16_224", features_only=True, **SMALL)
    # the full token map exists after each unit's ViT block and after its recovery; features_only: the units'
    assert net.feature_info.reduction() == [16, 16]
    assert net.feature_info.module_name() == ["blocks.0", "blocks.1"]
    x = torch.randn(2, 3, 224, 224, requires_grad=True)
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 14, 14)] * 2
    feats[-1].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    rect = timm.create_model("stvit_r_deit_small_patch16_224", img_size=(256, 320), **SMALL).eval()
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        maps = rect.forward_intermediates(x, intermediates_only=True)
        assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 20)] * 4
        tokens = rect.blocks[0].image_blocks(rect._embed_tokens(x))
        assert torch.equal(maps[0], tokens[:, 1:].reshape(1, 16, 20, 64).permute(0, 3, 1, 2))
        tokens = rect.blocks(rect._embed_tokens(x))
        assert torch.equal(maps[3], tokens[:, 1:].reshape(1, 16, 20, 64).permute(0, 3, 1, 2))


def test_flops_below_deit():
    with torch.device("meta"):
        deit = timm.create_model("deit_small_patch16_224")
        ours = timm.create_model("stvit_r_deit_small_patch16_224")
    assert count_flops(ours) < 0.5 * count_flops(deit)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="multiple of the 6-block"):
        timm.create_model("stvit_r_deit_small_patch16_224", depth=8, **SMALL)
    with pytest.raises(ValueError, match="perfect square"):
        timm.create_model("stvit_r_deit_small_patch16_224", num_semantic_tokens=10, **SMALL)


@pytest.mark.slow
def test_cli_recovery_conversion(tmp_path):
    out = tmp_path / "r"
    proc = run_cli("convert", "deit_tiny", "--recovery", "--no-pretrained", "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model"] == "stvit_r_deit_tiny_patch16_224" and summary["gflops"] < summary["base_gflops"]
    model = stvit_core.load_model(out)
    assert isinstance(model, RecoveryVisionTransformer)
    bad = tmp_path / "bad"
    proc = run_cli("convert", "deit_tiny", "--tokens-per-window", "9", "--no-pretrained", "--output", bad)
    assert_one_line_error(proc, "--tokens-per-window is for Swin")
    assert proc.returncode == 2 and not bad.exists()


def test_layer_decay_groups_follow_source_depth():
    from timm.models import group_parameters

    model = timm.create_model("stvit_r_deit_small_patch16_224", **SMALL)
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) == 1 + 12 + 1  # stem, the 12 source blocks (final norm joins the last, as in timm), head
