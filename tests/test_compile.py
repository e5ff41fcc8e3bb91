"""torch.compile sees one graph with no breaks, and does not recompile across calls of the same shape."""

from __future__ import annotations

import pytest
import timm
import torch

import stvit_core  # noqa: F401

from .conftest import TINY_VIT


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_one_graph_without_breaks(global_pool):
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, global_pool=global_pool).eval()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_training_step_has_no_graph_breaks():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, drop_path_rate=0.1).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_no_recompile_for_same_shape():
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        first = compiled(torch.randn(2, 3, 32, 32))
        for _ in range(3):
            out = compiled(torch.randn(2, 3, 32, 32))
    assert out.shape == first.shape == (2, 10)
