"""Speed steps a benchmark gives both models alike (--patch-gemm, --reparam): applied to base and STViT model,
recorded in the result, refused where they cannot apply."""

import pytest
import timm
import torch
from timm.layers import PatchEmbed

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.benchmark import BenchmarkSettings, benchmark_pair
from stvit_core.errors import InvalidArgumentError
from stvit_core.layers import PatchProjection

from .conftest import assert_one_line_error, run_cli

QUICK = dict(batch_size=2, device="cpu", rounds=1, min_round_time=0.01, warmup=0)
SWIN = dict(embed_dim=16, num_heads=(1, 2, 4, 8), num_classes=10, img_size=64, window_size=4)


def _pair(stem: str):
    torch.manual_seed(0)
    base = timm.create_model("swin_tiny_patch4_window7_224", **SWIN).eval()
    stvit = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", stem=stem, semantic_tokens_per_window=4,
                              **SWIN).eval()
    return base, stvit


def test_patch_gemm_is_given_to_both_models():
    base, stvit = _pair("patch")
    result = benchmark_pair(base, stvit, BenchmarkSettings(patch_gemm=True, **QUICK), input_size=(3, 64, 64))
    assert result["patch_gemm"] is True
    for model in (base, stvit):
        embeds = [m for m in model.modules() if isinstance(m, PatchEmbed)]
        assert embeds and all(isinstance(m.proj, PatchProjection) for m in embeds)


def test_reparam_folds_the_conv_stem_and_keeps_the_outputs():
    base, stvit = _pair("conv")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = stvit(x)
    result = benchmark_pair(base, stvit, BenchmarkSettings(reparam=True, **QUICK), input_size=(3, 64, 64))
    assert result["reparam"] is True
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stvit.modules())
    with torch.no_grad():
        torch.testing.assert_close(stvit(x), before, rtol=1e-4, atol=1e-5)


def test_reparam_is_for_inference_only():
    base, stvit = _pair("conv")
    with pytest.raises(InvalidArgumentError, match="reparam=True applies to inference only, not bench=train"):
        benchmark_pair(base, stvit, BenchmarkSettings(reparam=True, bench="train", **QUICK))
    result = run_cli("benchmark", "swin_tiny", "--device", "cpu", "--reparam", "--bench", "train")
    assert_one_line_error(result, "--reparam applies to inference only, not --bench train")
