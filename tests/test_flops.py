"""FLOPs in the paper's convention, checked against Table 1 for every DeiT configuration."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import stvit_core  # noqa: F401
from stvit_core.flops import count_flops, count_flops_by_module

# Table 1 of the paper (GFLOPs at 224 px): base, then 16 / 36 / 64 / 100 semantic tokens.
TABLE_1 = {
    "tiny": (1.26, {16: 0.53, 36: 0.60, 64: 0.71, 100: 0.86}),
    "small": (4.58, {16: 1.91, 36: 2.20, 64: 2.62, 100: 3.16}),
    "base": (17.58, {16: 7.31, 36: 8.44, 64: 10.04, 100: 12.13}),
}


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("size", TABLE_1)
def test_deit_bases_match_table_1(size):
    assert count_flops(_meta(f"deit_{size}_patch16_224")) == pytest.approx(TABLE_1[size][0], rel=0.025)


@pytest.mark.parametrize("size", TABLE_1)
@pytest.mark.parametrize("tokens", [16, 36, 64, 100])
def test_stvit_deit_matches_table_1(size, tokens):
    model = _meta(f"stvit_deit_{size}_patch16_224", num_semantic_tokens=tokens)
    assert count_flops(model) == pytest.approx(TABLE_1[size][1][tokens], rel=0.025)


class _OneAttention(nn.Module):
    """17 queries attend to 197 keys with 4 heads of 32 channels (C = 128), through the fused op."""

    def __init__(self):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(1, 4, 197, 32))

    def forward(self, q):
        return F.scaled_dot_product_attention(q, self.keys, self.keys)


def test_fused_attention_matmuls_are_counted_as_two_nq_nk_c_macs():
    gflops = count_flops(_OneAttention(), input_size=(4, 17, 32))
    assert gflops * 1e9 == pytest.approx(2 * 17 * 197 * 128)


def test_count_is_the_same_for_fused_and_explicit_attention():
    fused = timm.create_model("deit_tiny_patch16_224").eval()
    explicit = timm.create_model("deit_tiny_patch16_224").eval()
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    assert count_flops(fused) == pytest.approx(count_flops(explicit), rel=1e-9)


def test_flops_by_module_sums_to_total_and_shows_where_cost_goes():
    model = _meta("stvit_deit_small_patch16_224")
    parts = count_flops_by_module(model)
    assert sum(parts.values()) == pytest.approx(count_flops(model), rel=1e-9)
    # the four image-token blocks dominate: more than the generator and the semantic blocks together
    assert parts["blocks"] > parts["semantic_token_generator"] + parts["semantic_blocks"]


def test_flops_follow_input_size():
    model = _meta("stvit_deit_tiny_patch16_224", img_size=384)
    assert count_flops(model) > 2 * count_flops(_meta("stvit_deit_tiny_patch16_224"))
