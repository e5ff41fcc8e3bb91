"""Every STViT-R model takes any input size as a feature backbone: maps of ``ceil(size / stride)`` at timm's Swin
strides, and the model's own padding is invisible.

Where padding provably does not leak, and where it does (docs/dense-tasks.md, "Input sizes"): the stem pads the
image with zeros at the bottom and right to a multiple of its stride (4 for STViT-R-Swin, the patch for
STViT-R-DeiT), so the features of an image equal, exactly, the features of the same image on a zero canvas up to
that multiple. A larger canvas puts real tokens where the model would have padded: the Swin blocks attend to them
(timm's, mmdetection's and the released detector's Swin blocks mask no window padding) and global attention sees
every token, so the features change near the border, and everywhere once a global layer has mixed them. Both
sides are tested here; the released detector's masking of the semantic stage's padding is reproduced exactly
(tests/test_detection_backbone.py).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import stvit_core  # noqa: F401  (registers the models)

# every registered STViT-R model at a tiny width; the Swin ones over both layouts and both stems
CASES = [
    ("stvit_r_swin_tiny_patch4_window7_224", {}),
    ("stvit_r_swin_small_patch4_window7_224", {"layout": "detection"}),
    ("stvit_r_swin_base_patch4_window7_224", {"stem": "patch"}),
    ("stvit_r_swin_tiny_patch4_window7_224", {"layout": "detection", "stem": "patch"}),
    ("stvit_r_deit_tiny_patch16_224", {}),
    ("stvit_r_deit_small_patch16_224", {}),
    ("stvit_r_deit_base_patch16_224", {}),
    ("stvit_r_vit_patch16_224", {"class_token": False, "global_pool": "avg"}),
]
IDS = [name.split("_patch")[0] + "".join(f"-{v}" for v in kwargs.values()) for name, kwargs in CASES]


def test_the_cases_cover_every_registered_stvit_r_model():
    """A new STViT-R model must join CASES (and so every test below)."""
    assert {name for name, _ in CASES} == set(timm.list_models("stvit_r_*"))


def tiny(name: str, **kwargs) -> torch.nn.Module:
    width = dict(embed_dim=16, num_heads=(1, 2, 4, 8)) if "swin" in name else dict(embed_dim=48, num_heads=3)
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=0, **width, **kwargs).eval()


def stem_multiple(model: torch.nn.Module) -> int:
    return model.patch_embed.patch_size[0]


@pytest.mark.parametrize("size", [(333, 517), pytest.param((800, 1333), marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_feature_maps_at_odd_sizes_have_timm_strides(case, size):
    name, kwargs = case
    model = tiny(name, dynamic_img_size=True, **kwargs)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    info = model.feature_info
    assert [tuple(m.shape) for m in maps] == [
        (1, i["num_chs"], math.ceil(size[0] / i["reduction"]), math.ceil(size[1] / i["reduction"])) for i in info]
    if "swin" in name:
        assert [i["reduction"] for i in info] == [4, 8, 16, 32]  # timm's Swin strides
        assert [tuple(m.shape[-2:]) for m in maps][-1] == (math.ceil(size[0] / 32), math.ceil(size[1] / 32))
    else:
        assert {i["reduction"] for i in info} == {16}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_padding_to_the_stem_multiple_does_not_leak_and_more_does(case):
    name, kwargs = case
    model = tiny(name, dynamic_img_size=True, **kwargs)
    H, W = 333, 517
    image = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    m = stem_multiple(model)
    canvas = F.pad(image, (0, -W % m, 0, -H % m))  # the image on a zero canvas up to the stem's multiple
    assert canvas.shape[-2:] != image.shape[-2:]
    larger = F.pad(image, (0, 32, 0, 32))  # one stride-32 step more
    with torch.no_grad():
        maps = model.forward_intermediates(image, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(maps, model.forward_intermediates(canvas, intermediates_only=True)))
        # beyond the stem's multiple the canvas is content: the last map differs over the image's own region
        last = model.forward_intermediates(larger, intermediates_only=True)[-1]
        h, w = maps[-1].shape[-2:]
        assert (last[..., :h, :w] - maps[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=[IDS[0], IDS[1], IDS[4]])
def test_dynamic_size_equals_a_model_built_for_the_size(case):
    """``dynamic_img_size=True`` computes, per call, what a model built with ``img_size=(H, W)`` (static shapes:
    index buffers, position embeddings resampled once) computes. Swin's classification layout is built at the size
    here because timm's Swin decides from the build size whether a stage shifts its windows (the detection layout
    always shifts, as mmdetection does). STViT-R-DeiT is built at a multiple of the patch: a static timm ViT drops
    what is left over (its convolution), a dynamic one pads."""
    name, kwargs = case
    size = (333, 517) if "swin" in name else (336, 528)
    static = tiny(name, img_size=size, **kwargs)
    build = size if kwargs.get("layout") != "detection" and "swin" in name else 224
    dynamic = tiny(name, dynamic_img_size=True, img_size=build, **kwargs)
    state = static.state_dict()
    if "pos_embed" in state:  # the dynamic model keeps its 224 px table and resamples it per call
        state["pos_embed"] = dynamic.pos_embed.detach().clone()
        static.load_state_dict({**state, "pos_embed": timm.layers.resample_abs_pos_embed(
            state["pos_embed"], static.patch_embed.grid_size, num_prefix_tokens=static.num_prefix_tokens)})
    dynamic.load_state_dict(state)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        for a, b in zip(static.forward_intermediates(x, intermediates_only=True),
                        dynamic.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_features_only_backbones_at_odd_sizes():
    """timm's feature wrapper: NHWC Swin maps by default, NCHW on request; the detection layout's maps are its
    normalised outputs; STViT-R-DeiT NCHW."""
    x = torch.randn(1, 3, 150, 205)
    width = dict(embed_dim=16, num_heads=(1, 2, 4, 8))
    with torch.no_grad():
        for kwargs in ({}, {"layout": "detection"}):
            torch.manual_seed(0)
            nhwc = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", features_only=True, dynamic_img_size=True,
                                     **width, **kwargs).eval()
            shapes = [tuple(f.shape) for f in nhwc(x)]
            assert shapes == [(1, 38, 52, 16), (1, 19, 26, 32), (1, 10, 13, 64), (1, 5, 7, 128)], kwargs
            torch.manual_seed(0)  # the same weights
            nchw = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", features_only=True, dynamic_img_size=True,
                                     output_fmt="NCHW", **width, **kwargs).eval()
            assert all(torch.equal(a.permute(0, 3, 1, 2), b) for a, b in zip(nhwc(x), nchw(x)))
        deit = timm.create_model("stvit_r_deit_tiny_patch16_224", features_only=True, dynamic_img_size=True,
                                 embed_dim=48, num_heads=3).eval()
        assert [tuple(f.shape) for f in deit(x)] == [(1, 48, 10, 13)] * 2
