"""Every registered model exports with a dynamic batch: ``torch.export.export`` and ONNX (dynamo exporter), run
at batch 1 and 3 (the exported program, and onnxruntime for ONNX) against eager PyTorch within 1e-4.

Each model is exported once: the ``torch.export`` program is run, then converted to ONNX (what
``torch.onnx.export(model, ..., dynamo=True)`` does internally), so the slow part is paid once per model.
Also here: the static-gather pooling that makes the models exportable equals torch's adaptive pooling.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.export import Dim

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.layers import adaptive_pool_index, gather_max, pool_image_tokens, pool_windows

CASES = [(name, {}) for name in timm.list_models("stvit_*")] + [
    ("stvit_deit_small_patch16_224", {"num_semantic_tokens": 36}),
    ("stvit_r_swin_tiny_patch4_window7_224", {"features_only": True}),
    ("stvit_r_deit_tiny_patch16_224", {"features_only": True}),
]
TOLERANCE = 1e-4


def _case_id(case) -> str:
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def _outputs(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _max_diff(outputs, references) -> float:
    outputs, references = _outputs(outputs), _outputs(references)
    assert len(outputs) == len(references)
    return max((torch.as_tensor(o) - r).abs().max().item() for o, r in zip(outputs, references))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_exports_with_dynamic_batch_and_matches_pytorch(case, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    name, kwargs = case
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    size = model.pretrained_cfg["input_size"]
    inputs = {batch: torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch)) for batch in (1, 3)}
    with torch.no_grad():
        expected = {batch: model(x) for batch, x in inputs.items()}

    # the example batch is 3, not 1: torch.export specialises sizes 0 and 1
    program = torch.export.export(model, (inputs[3],), dynamic_shapes={"x": {0: Dim("batch", min=1, max=1024)}})
    exported = program.module()
    with torch.no_grad():
        for batch, x in inputs.items():
            assert _max_diff(exported(x), expected[batch]) <= TOLERANCE, (name, "torch.export", batch)

    path = tmp_path / "model.onnx"
    torch.onnx.export(program, (inputs[3],), dynamo=True, optimize=False).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    assert not isinstance(feed.shape[0], int), "the batch dimension must stay symbolic"
    for batch, x in inputs.items():
        diff = _max_diff([torch.from_numpy(o) for o in session.run(None, {feed.name: x.numpy()})], expected[batch])
        assert diff <= TOLERANCE, (name, "onnxruntime", batch, diff)


# --- the pooling the export relies on: a static gather + max, the same values as torch's adaptive pooling -------

GRIDS = [(14, 14), (7, 7), (8, 8), (24, 24), (10, 20), (13, 9), (16, 20), (1, 5)]


@pytest.mark.parametrize("grid", GRIDS)
def test_gather_pooling_equals_adaptive_pooling(grid):
    H, W = grid
    x = torch.randn(2, H * W, 5)
    with_nan = x.clone()
    with_nan[0, 3] = float("nan")  # NaN propagates as in adaptive_max_pool2d
    for side in range(1, min(H, W) + 1):
        for tokens in (x, with_nan):
            expected = F.adaptive_max_pool2d(tokens.transpose(1, 2).reshape(2, 5, H, W), side)
            expected = expected.flatten(2).transpose(1, 2)
            got = gather_max(tokens, adaptive_pool_index(grid, side))
            assert torch.equal(got.isnan(), expected.isnan())
            assert torch.equal(got.nan_to_num(), expected.nan_to_num()), (grid, side)
            assert torch.equal(pool_image_tokens(tokens, grid, side).nan_to_num(), got.nan_to_num())
        expected = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 5, H, W), side).flatten(2).transpose(1, 2)
        assert torch.equal(pool_image_tokens(x, grid, side, "avg"), expected)


@pytest.mark.parametrize("grid", [(14, 14), (16, 20), (8, 10), (25, 42), (7, 7)])
@pytest.mark.parametrize("side", [1, 2, 3, 4])
def test_window_pooling_equals_adaptive_pooling_of_the_padded_map(grid, side):
    """Pooling every 7x7 window (window-major order) = torch's adaptive pooling of the zero-padded map as a whole,
    which for max is also every window pooled on its own."""
    H, W = grid
    x = torch.randn(2, H, W, 6)
    nh, nw = -(-H // 7), -(-W // 7)
    padded = F.pad(x, (0, 0, 0, nw * 7 - W, 0, nh * 7 - H)).permute(0, 3, 1, 2)

    def window_major(pooled: torch.Tensor) -> torch.Tensor:
        return pooled.reshape(2, 6, nh, side, nw, side).permute(0, 2, 4, 3, 5, 1).reshape(2, -1, 6)

    for mode, pool in (("max", F.adaptive_max_pool2d), ("avg", F.adaptive_avg_pool2d)):
        expected = window_major(pool(padded, (nh * side, nw * side)))
        assert torch.equal(pool_windows(x, 7, side, mode), expected), (grid, side, mode)
        assert torch.equal(pool_windows(x, 7, side, mode, grid_size=grid), expected), (grid, side, mode)
    windows = padded.reshape(2, 6, nh, 7, nw, 7).permute(0, 2, 4, 1, 3, 5).reshape(-1, 6, 7, 7)
    per_window = F.adaptive_max_pool2d(windows, side).reshape(2, nh * nw, 6, side * side).transpose(2, 3)
    assert torch.equal(pool_windows(x, 7, side), per_window.reshape(2, -1, 6))
