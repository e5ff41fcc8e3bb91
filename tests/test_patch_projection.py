"""PatchProjection: the patch convolution as one GEMM (the CUDA path, forced onto the CPU here), the same module
and state dict as the convolution; an opt-in step (use_patch_gemm) for any timm model with a patch embedding."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import PatchEmbed

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.layers import PatchProjection, SemanticTokenGenerator, use_patch_projection
from stvit_core.models import use_patch_gemm


def force_gemm(model: nn.Module, on: bool = True) -> None:
    """Run every PatchProjection of ``model`` through its GEMM on the CPU (``on``) or through the convolution."""
    for module in model.modules():
        if isinstance(module, PatchProjection):
            module.gemm_devices = ("cpu",) if on else ("cuda",)


@pytest.mark.parametrize("size", [(64, 64), (70, 53)])  # 53 and 70: the convolution drops the remainder
def test_gemm_path_equals_the_convolution(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel_size=16, stride=16)
    proj = PatchProjection.from_conv(conv)
    x = torch.randn(2, 3, *size)
    proj.gemm_devices = ("cpu",)
    out = proj(x)
    ref = conv(x)
    assert out.shape == ref.shape == (2, 24, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.flatten(2).transpose(1, 2).is_contiguous()  # timm's NLC flatten after it is a view, no copy
    proj.gemm_devices = ("cuda",)  # elsewhere: the convolution itself, bit for bit
    assert torch.equal(proj(x), ref)


def test_from_conv_shares_the_parameters_and_draws_no_random_number():
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)
    state = torch.random.get_rng_state()
    proj = PatchProjection.from_conv(conv)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert proj.weight is conv.weight and proj.bias is None
    assert list(proj.state_dict()) == ["weight"]


def test_only_plain_patchifying_convolutions_are_swapped():
    embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    weight = embed.proj.weight
    assert isinstance(use_patch_projection(embed), PatchProjection) and embed.proj.weight is weight
    overlapping = nn.Module()
    overlapping.proj = nn.Conv2d(3, 16, kernel_size=7, stride=4, padding=3)
    assert use_patch_projection(overlapping) is None and type(overlapping.proj) is nn.Conv2d
    assert use_patch_projection(nn.Identity()) is None
    with pytest.raises(ValueError, match="kernel_size == stride"):
        PatchProjection(3, 8, kernel_size=3, stride=2)


@pytest.mark.parametrize("name, kwargs", [
    ("stvit_deit_small_patch16_224", dict(embed_dim=48, num_heads=3, img_size=96)),
    ("stvit_r_deit_small_patch16_224", dict(embed_dim=48, num_heads=3, img_size=96)),
    ("stvit_r_swin_tiny_patch4_window7_224", dict(embed_dim=24, num_heads=(1, 2, 4, 8), stem="patch")),
    ("deit_small_patch16_224", dict(embed_dim=48, num_heads=3, img_size=96)),  # the base models alike
    ("swin_tiny_patch4_window7_224", dict(embed_dim=24, num_heads=(1, 2, 4, 8))),
])
def test_use_patch_gemm_swaps_the_projection_and_it_gives_the_convolutions_logits(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    assert type(model.patch_embed.proj) is nn.Conv2d  # constructors build the plain model
    state = model.state_dict()
    x = torch.randn(2, 3, 224, 224) if "swin" in name else torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
        assert use_patch_gemm(model) == 1
        assert isinstance(model.patch_embed.proj, PatchProjection)
        assert list(model.state_dict()) == list(state)  # the checkpoint layout of the convolution
        assert torch.equal(model(x), ref)  # on the CPU: the convolution itself
        force_gemm(model)
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_use_patch_gemm_leaves_the_conv_stem():
    model = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", embed_dim=24, num_heads=(1, 2, 4, 8))
    assert use_patch_gemm(model) == 0


def test_timm_deit_checkpoint_loads_into_the_projection():
    deit = timm.create_model("deit_small_patch16_224", embed_dim=48, num_heads=3, img_size=96, num_classes=10)
    stvit = timm.create_model("stvit_deit_small_patch16_224", embed_dim=48, num_heads=3, img_size=96,
                              num_classes=10)
    use_patch_gemm(stvit)
    stvit.patch_embed.load_state_dict(deit.patch_embed.state_dict())
    assert torch.equal(stvit.patch_embed.proj.weight, deit.patch_embed.proj.weight)


def test_generator_reuses_the_callers_sequence_as_layer_one_context():
    torch.manual_seed(0)
    generator = SemanticTokenGenerator(32, num_heads=2, num_semantic_tokens=4, num_prefix_tokens=1,
                                       grid_size=(4, 4)).eval()
    sequence = torch.randn(2, 17, 32)
    prefix, image = sequence[:, :1], sequence[:, 1:]
    with torch.no_grad():
        ref = generator(image, (4, 4), prefix)
        out = generator(image, (4, 4), prefix, context=sequence)
    assert torch.equal(out, ref)
