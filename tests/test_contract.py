"""timm's model contract, checked on every registered ``stvit_*`` model.

Written from timm's documented model API (``pretrained_cfg``, ``forward_features`` / ``forward_head``,
``reset_classifier``, ``forward_intermediates`` / ``prune_intermediate_layers``, ``features_only``, ``torch.fx``
feature extraction, ``set_input_size``, ``torch.compile``). Default configurations are checked for shapes on
the meta device (no compute); everything that computes uses the same architecture at a tiny width.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import FeatureInfo, create_feature_extractor, get_graph_node_names

import stvit_core  # noqa: F401  (registers the models)

MODELS = timm.list_models("stvit_*")
SWIN = [m for m in MODELS if "swin" in m]
VIT = [m for m in MODELS if "swin" not in m]
CFG_KEYS = ("num_classes", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "first_conv",
            "classifier", "license")


def test_every_family_is_registered():
    assert len(MODELS) == 11 and len(SWIN) == 3
    assert {m.split("_patch")[0] for m in MODELS} >= {"stvit_deit_tiny", "stvit_r_deit_base", "stvit_r_swin_small"}


def tiny_kwargs(name: str) -> dict:
    """The model's own architecture at a tiny width (Swin at 224 px: its windows; ViT: 8x8 image tokens)."""
    if "swin" in name:
        return dict(embed_dim=16, num_heads=(1, 2, 4, 8), num_classes=10)
    return dict(img_size=64, patch_size=8, embed_dim=48, num_heads=3, num_classes=10)


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**tiny_kwargs(name), **kwargs})


def image(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    size = getattr(model, "img_size", None) or model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def channel_dim(model: torch.nn.Module, feats: torch.Tensor) -> int:
    """timm's rule for non-standard families: ``feature_dim`` if set (-1: NHWC, Swin), else tokens ``(B, N, C)``
    last, maps ``(B, C, H, W)`` second."""
    dim = getattr(model, "feature_dim", None)
    return dim if dim is not None else (-1 if feats.ndim == 3 else 1)


# --- default configurations (shapes on the meta device) -------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_keys_and_shapes(name):
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        cfg = model.pretrained_cfg
        assert all(k in cfg for k in CFG_KEYS), [k for k in CFG_KEYS if k not in cfg]
        state = model.state_dict()
        assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
        assert model.num_classes == cfg["num_classes"] == 1000 and model.num_features > 0
        x = torch.empty(2, *cfg["input_size"])
        feats = model.forward_features(x)
        assert feats.shape[0] == 2 and feats.shape[channel_dim(model, feats)] == model.num_features
        if cfg["pool_size"]:  # Swin: an unpooled NHWC map of pool_size
            assert model.output_fmt == "NHWC" and tuple(feats.shape[1:3]) == cfg["pool_size"]
        else:  # ViT families: tokens (class token + semantic tokens, or the recovered map)
            assert feats.ndim == 3
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert model(x).shape == (2, 1000)
        info = FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
        assert len(info) >= 3 and all(r in (4, 8, 16, 32) for r in info.reduction())


def test_pretrained_tags_say_what_the_weights_are():
    """DeiT families: DeiT's weights, converted on load and never fine-tuned (``fb_in1k_converted``); STViT-R-Swin
    S/B: the authors' own ImageNet-1k release (``in1k``), from their Hub repository."""
    tagged = timm.list_pretrained("stvit_*")
    released = {"stvit_r_swin_small_patch4_window7_224.in1k", "stvit_r_swin_base_patch4_window7_224.in1k"}
    assert released <= set(tagged)
    assert all(t.endswith(".fb_in1k_converted") for t in set(tagged) - released)
    cfg = timm.models.get_pretrained_cfg("stvit_deit_small_patch16_224")  # the untagged name: the same weights
    assert cfg.tag == "fb_in1k_converted" and cfg.hf_hub_id == "timm/deit_small_patch16_224.fb_in1k"
    cfg = timm.models.get_pretrained_cfg("stvit_r_swin_small_patch4_window7_224")
    assert (cfg.tag, cfg.hf_hub_id, cfg.hf_hub_filename) == ("in1k", "csncsn/STViT-R", "STViT-R-Swin-S.pth")
    assert timm.models.get_pretrained_cfg("stvit_r_swin_base_patch4_window7_224").hf_hub_filename == "STViT-R-Swin-B.pth"


# --- forward, backward, head --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_every_parameter_learns(name):
    model = tiny(name).train()
    out = model(image(model))
    assert out.shape == (2, 10) and not out.isnan().any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", MODELS)
def test_forward_features_head_and_grad_checkpointing(name):
    model = tiny(name).eval()
    x = image(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
        assert torch.equal(model.forward_head(feats), out)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name):
    model = tiny(name).eval()
    x = image(model)
    with torch.no_grad():
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size) and model.num_classes == 0
        model.reset_classifier(0, "")  # no pooling: the unpooled features
        unpooled = model(x)
        assert unpooled.shape == model.forward_features(x).shape
        headless = tiny(name, num_classes=0).eval()
        assert headless(x).shape == (2, headless.num_features)


# --- forward_intermediates, features_only ---------------------------------------------------------------------


def _expected_map(model: torch.nn.Module, info: dict, batch: int = 2) -> tuple:
    size = model.patch_embed.img_size
    return (batch, info["num_chs"], math.ceil(size[0] / info["reduction"]), math.ceil(size[1] / info["reduction"]))


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_all_indices_and_formats(name):
    model = tiny(name).eval()
    x = image(model)
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [tuple(m.shape) for m in maps] == [_expected_map(model, i) for i in info]
        only = model.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(only, maps))
        for i in range(len(info)):
            (one,) = model.forward_intermediates(x, indices=[i], intermediates_only=True, stop_early=True)
            assert torch.equal(one, maps[i])
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, maps[-2:]))
        other_fmt = "NHWC" if name in SWIN else "NLC"
        others = model.forward_intermediates(x, output_fmt=other_fmt, intermediates_only=True)
        for m, o in zip(maps, others):
            as_nchw = o.permute(0, 3, 1, 2) if other_fmt == "NHWC" else o.transpose(1, 2).reshape(m.shape)
            assert torch.equal(as_nchw, m)
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NCL")


@pytest.mark.parametrize("name", MODELS)
def test_features_only_with_out_indices(name):
    full = tiny(name, num_classes=0)  # the same weights as the feature net (same seed, same shapes)
    last = len(full.feature_info) - 1
    net = tiny(name, features_only=True, out_indices=(0, last), num_classes=0).eval()
    x = image(full)
    with torch.no_grad():
        feats = net(x)
        expected = [_expected_map(full, full.feature_info[i]) for i in (0, last)]
        if name in SWIN:  # timm's Swin convention: NHWC stage maps
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        assert [tuple(f.shape) for f in feats] == expected
        assert net.feature_info.channels() == [e[1] for e in expected]
        full.eval()
        maps = full.forward_intermediates(x, indices=[0, last], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(feats, maps))
    if name in SWIN:
        nchw = tiny(name, features_only=True, out_indices=(0, last), output_fmt="NCHW").eval()
        with torch.no_grad():
            assert [tuple(f.shape) for f in nchw(x)] == expected


def test_features_only_prunes_what_it_does_not_need():
    """timm's getter prunes: STViT-DeiT's generator and semantic blocks go when only image-token maps are asked."""
    full = tiny("stvit_deit_small_patch16_224")
    net = tiny("stvit_deit_small_patch16_224", features_only=True, out_indices=(1,))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net) < count(full) / 4
    assert not any("semantic" in n for n, _ in net.named_parameters())


# --- torch.fx (timm's feature extraction) ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_and_backward(name):
    model = tiny(name).eval()
    x = image(model)
    train_nodes, eval_nodes = get_graph_node_names(model)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        (out,) = traced(x).values()
        assert torch.equal(out, model(x))
    model.train()
    traced = create_feature_extractor(model, return_nodes=[train_nodes[-1]])
    (out,) = traced(x).values()
    out.mean().backward()
    assert all(p.grad is not None for p in traced.parameters())


def test_fx_feature_extractor_returns_intermediate_maps():
    model = tiny("stvit_r_swin_tiny_patch4_window7_224").eval()
    x = image(model)
    traced = create_feature_extractor(model, return_nodes={"layers.2": "stage3"})
    with torch.no_grad():
        assert torch.equal(traced(x)["stage3"].permute(0, 3, 1, 2), model.forward_intermediates(x, indices=[2])[1][0])


# --- input sizes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VIT)
def test_vit_families_set_input_size(name):
    model = tiny(name).eval()
    model.set_input_size(img_size=(80, 96))
    built = tiny(name, img_size=(80, 96)).eval()
    built.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 80, 96)
    with torch.no_grad():
        assert torch.equal(model(x), built(x))
        assert model.forward_intermediates(x, intermediates_only=True)[-1].shape[-2:] == (10, 12)
    dynamic = tiny(name, dynamic_img_size=True).eval()  # any size: the generator pools each input's grid
    with torch.no_grad():
        assert dynamic.forward_intermediates(torch.randn(1, 3, 80, 100), intermediates_only=True)[-1].shape[-2:] == (10, 13)
        assert dynamic(torch.randn(1, 3, 80, 100)).shape == (1, 10)


@pytest.mark.parametrize("name", SWIN)
def test_swin_set_input_size_and_dynamic_size(name):
    model = tiny(name).eval()
    model.set_input_size(img_size=(256, 320))
    built = tiny(name, img_size=(256, 320)).eval()
    built.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        assert torch.equal(model(x), built(x))
        dynamic = tiny(name, dynamic_img_size=True).eval()
        for size in ((224, 224), (256, 320), (192, 288)):
            maps = dynamic.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
            assert [tuple(m.shape[-2:]) for m in maps] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]


# --- torch.compile ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stvit_deit_small_patch16_224", "stvit_r_swin_tiny_patch4_window7_224"])
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    model = tiny(name).eval()
    x = image(model)
    # fullgraph: one graph, no break; aot_eager traces it through AOTAutograd without the C++ build of inductor
    # (minutes on CI's 2 cores)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
