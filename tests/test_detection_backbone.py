"""The released detection backbone (layout='detection') and the released weights.

* The COCO-detector fixture (tests/fixtures/README.md) holds a reduced-width STViT-R-Swin-S Cascade Mask R-CNN in the
  released mmdetection format and the feature maps the *official* detection code computes from it at three odd
  sizes (window padding on the right only, on both sides, on neither). Converted, our detection layout gives the
  same maps, with static shapes and with dynamic ones.
* ``pretrained=True`` loads the authors' ImageNet release through timm's pretrained machinery (a local file, and the
  Hub download from csncsn/STViT-R served by a loopback Hub).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import stvit_core
from stvit_core import load_model
from stvit_core.checkpoint import load_state_dict_file
from stvit_core.hub_access import disable_xet_unless_huggingface
from stvit_core.layers import local_image_context, local_semantic_context
from stvit_core.models.swin import checkpoint_filter_fn

from .conftest import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
TINY_S = dict(embed_dim=8, num_heads=(2, 4, 8, 16))  # the fixtures' width
TOLERANCE = 5e-5  # float32 reassociation (features of magnitude ~3); measured 1.1e-5


@pytest.fixture(scope="module")
def coco_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("coco") / "cascade_mask_rcnn_swin_small_tiny_coco.pth"
    path.write_bytes(gzip.decompress((FIXTURES / "stvit_r_swin_coco_tiny.pth.gz").read_bytes()))
    return path


@pytest.fixture(scope="module")
def coco_expected():
    return torch.load(FIXTURES / "stvit_r_swin_coco_tiny_expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def release_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("release") / "STViT-R-Swin-S.pth"
    path.write_bytes(gzip.decompress((FIXTURES / "stvit_r_swin_release_tiny.pth.gz").read_bytes()))
    return path


def inputs(case: dict, expected: dict) -> torch.Tensor:
    return (case["images"].float() - expected["mean"][:, None, None]) / expected["std"][:, None, None]


def max_diff(maps, reference) -> float:
    assert [tuple(m.shape) for m in maps] == [tuple(r.shape) for r in reference]
    return max((m - r).abs().max().item() for m, r in zip(maps, reference))


# --- the official detection backbone, reproduced -----------------------------------------------------------------


def test_converted_coco_backbone_reproduces_the_official_detection_backbone(coco_ckpt, coco_expected):
    model = load_model("swin_small", convert=True, checkpoint=coco_ckpt).eval()
    assert model.layout == "detection" and model.num_classes == 0 and model.dynamic_img_size
    assert sum(p.numel() for p in model.parameters()) == 361_256  # the official backbone at this width
    with torch.no_grad():
        for case in coco_expected["cases"]:
            x = inputs(case, coco_expected)
            assert max_diff(model.forward_intermediates(x, intermediates_only=True), case["features"]) <= TOLERANCE
            static = timm.create_model("stvit_r_swin_small_patch4_window7_224", layout="detection", num_classes=0,
                                       img_size=tuple(x.shape[-2:]), **TINY_S).eval()
            static.load_state_dict(model.state_dict())
            assert max_diff(static.forward_intermediates(x, intermediates_only=True), case["features"]) <= TOLERANCE


def test_neighbourhood_gathers_in_pieces_give_the_official_maps(coco_ckpt, coco_expected, monkeypatch):
    """CPU inference gathers large neighbourhoods a piece of windows at a time (CrossAttention.gather_chunk_bytes);
    with pieces of one window, of a few, and in one gather, the maps are the official ones and identical. With
    gradients flowing it keeps one gather per layer (pieces would each scatter into a full-size gradient)."""
    model = load_model("swin_small", convert=True, checkpoint=coco_ckpt).eval()
    case = coco_expected["cases"][1]  # stage-3 map padded at the bottom and right: masks in every piece
    x = inputs(case, coco_expected)
    original = torch.Tensor.index_select

    def run(chunk_bytes: int, grad: bool):
        monkeypatch.setattr(stvit_core.layers.CrossAttention, "gather_chunk_bytes", chunk_bytes)
        gathers = []

        def counting(self, dim, index):
            gathers.append(index.numel())
            return original(self, dim, index)

        monkeypatch.setattr(torch.Tensor, "index_select", counting)
        with torch.set_grad_enabled(grad):
            maps = model.forward_intermediates(x, intermediates_only=True)
        monkeypatch.setattr(torch.Tensor, "index_select", original)
        assert max_diff(maps, case["features"]) <= TOLERANCE
        return [m.detach() for m in maps], len(gathers)

    # 600 kB: a few windows at this width (64 floats a key-value pair, 729 slots in the recovery)
    (one_window, n1), (few, n2), (whole, n3) = (run(c, grad=False) for c in (1, 600_000, 2**40))
    assert all(torch.equal(a, b) for a, b in zip(one_window, whole))
    assert all(torch.equal(a, b) for a, b in zip(few, whole))
    assert n1 > n2 > n3  # one gather per window, per few windows, per layer
    assert run(1, grad=True)[1] == n3  # (the maps are checked inside run)


def test_the_release_masking_matters(coco_ckpt, coco_expected):
    """Without the release's padding masks the maps move away from the official ones where the stage-3 map is
    padded (the static model's mask buffers are dropped)."""
    case = coco_expected["cases"][1]  # stage-3 map 10x13: padded at the bottom and right
    x = inputs(case, coco_expected)
    model = timm.create_model("stvit_r_swin_small_patch4_window7_224", layout="detection", num_classes=0,
                              img_size=tuple(x.shape[-2:]), **TINY_S).eval()
    model.load_state_dict(load_model("swin_small", convert=True, checkpoint=coco_ckpt).state_dict())
    with torch.no_grad():
        assert max_diff(model.forward_intermediates(x, intermediates_only=True), case["features"]) <= TOLERANCE
        for unit in model.layers[2].units:
            assert unit.generator.context_mask is not None and unit.recovery.semantic_mask is not None
            unit.generator.context_mask = unit.generator.refine_mask = unit.recovery.semantic_mask = None
        assert max_diff(model.forward_intermediates(x, intermediates_only=True), case["features"]) > 1e-3


def _release_mask_oracle(extent, pads, window, size, stride_extent):
    """The release's mask written from its description: zeros on the (padded) grid, -1000 on ``[-pad_b:, -pad_r:]``
    (Python slicing), -1000 around it, unfolded into ``size x size`` neighbourhoods with the window's stride."""
    (Hx, Wx), (pad_b, pad_r) = extent, pads
    left = (size - window) // 2
    mask = torch.zeros(1, 1, Hx, Wx)
    mask[:, :, -pad_b:, -pad_r:] = -1000
    mask = F.pad(mask, (left, size - window - left, left, size - window - left), value=-1000)
    return F.unfold(mask, kernel_size=size, stride=stride_extent).view(size * size, -1).t() == 0


@pytest.mark.parametrize("grid", [(7, 10), (10, 13), (14, 7), (14, 14), (3, 20), (22, 9)])
def test_neighbourhood_masks_are_the_release_ones(grid):
    """The masks equal the release's recipe (where a group is masked everywhere, the release's uniform -1000 masks
    nothing); image-token keys outside the map point at the appended zero token."""
    H, W = grid
    nh, nw = -(-H // 7), -(-W // 7)
    for size in (14, 21):
        index, mask = local_image_context(grid, 7, size)
        oracle = _release_mask_oracle((nh * 7, nw * 7), (nh * 7 - H, nw * 7 - W), 7, size, 7)
        oracle = oracle | ~oracle.any(1, keepdim=True)
        assert torch.equal(mask if mask is not None else torch.ones_like(oracle), oracle), (grid, size)
        assert index.shape == (nh * nw, size * size) and int(index.max()) == H * W
    index, mask = local_semantic_context(grid, 7, 3, 27)
    oracle = _release_mask_oracle((nh * 3, nw * 3), (nh * 7 - H, nw * 7 - W), 3, 27, 3)
    oracle = oracle | ~oracle.any(1, keepdim=True)
    assert torch.equal(mask if mask is not None else torch.ones_like(oracle), oracle), grid
    assert int(index.max()) == nh * nw * 9


@pytest.mark.slow
def test_cli_extracts_the_coco_backbone_into_a_feature_backbone_directory(coco_ckpt, coco_expected, tmp_path):
    out = tmp_path / "stvit-r-swin-s-coco"
    proc = run_cli("convert", "swin_small", "--checkpoint", str(coco_ckpt), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert stvit_core.load_model(out).layout == "detection"
    net = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True, output_fmt="NCHW").eval()
    assert net.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        for case in coco_expected["cases"]:
            assert max_diff(net(inputs(case, coco_expected)), case["features"]) <= TOLERANCE


def test_coco_backbone_loads_through_timm_and_only_into_the_detection_layout(coco_ckpt, coco_expected):
    """The detector file as a timm pretrained source: the filter takes its backbone; a classification-layout model
    refuses it."""
    case = coco_expected["cases"][0]
    net = timm.create_model("stvit_r_swin_small_patch4_window7_224", pretrained=True, features_only=True,
                            output_fmt="NCHW", layout="detection", dynamic_img_size=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(coco_ckpt), num_classes=0), **TINY_S).eval()
    with torch.no_grad():
        assert max_diff(net(inputs(case, coco_expected)), case["features"]) <= TOLERANCE
    with pytest.raises(ValueError, match="layout='detection' only"):
        checkpoint_filter_fn(torch.load(coco_ckpt, weights_only=True)["state_dict"],
                             timm.create_model("stvit_r_swin_small_patch4_window7_224", num_classes=0, **TINY_S))


def test_detection_layout_parameter_counts():
    """The released detection backbones: the classification model less its head and final norm, plus a LayerNorm
    per output map (Swin-S: 48,857,862 as built from the released detection code)."""
    with torch.device("meta"):
        for name, classification, widths in (("small", 49_625_518, (96, 192, 384, 768)),
                                             ("base", 87_812_336, (128, 256, 512, 1024))):
            net = timm.create_model(f"stvit_r_swin_{name}_patch4_window7_224", layout="detection", features_only=True)
            head = widths[-1] * 1000 + 1000
            expected = classification - head - 2 * widths[-1] + 2 * sum(widths)
            assert sum(p.numel() for p in net.parameters()) == expected
    assert expected == 86_789_128 and sum(2 * w for w in (96, 192, 384, 768)) == 2_880


def test_imagenet_weights_load_into_the_detection_layout(release_ckpt):
    """As the released detector was fine-tuned: the ImageNet release's weights, the feature norms at identity."""
    classification = load_model("swin_small", convert=True, checkpoint=release_ckpt)
    detection = timm.create_model("stvit_r_swin_small_patch4_window7_224", layout="detection", num_classes=10,
                                  **TINY_S)
    detection.load_state_dict(checkpoint_filter_fn(load_state_dict_file(release_ckpt), detection))
    target = classification.state_dict()
    for k, v in detection.state_dict().items():
        if k.startswith("feature_norms."):
            assert torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v))
        else:
            assert torch.equal(v, target[k]), k
    assert not any(k.startswith("norm.") for k in detection.state_dict())


# --- the ImageNet release through timm's pretrained machinery ----------------------------------------------------


def test_pretrained_loads_and_converts_the_release_file(release_ckpt):
    """``pretrained=True`` with timm's loader pointed at a local copy of the release file (weights-only unpickling:
    the file's pickled yacs config is read as a plain mapping)."""
    expected = torch.load(FIXTURES / "stvit_r_swin_release_tiny_expected.pt", weights_only=True)
    model = timm.create_model("stvit_r_swin_small_patch4_window7_224", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(release_ckpt), num_classes=10), **TINY_S).eval()
    assert model.pretrained_cfg["tag"] == "in1k"
    with torch.no_grad():
        assert (model(expected["input"]) - expected["logits"]).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_pretrained_downloads_the_release_from_the_hub(release_ckpt, tmp_path):
    """The download itself: csncsn/STViT-R on a loopback Hub (huggingface_hub reads HF_ENDPOINT at import, hence a
    subprocess), the file named by the cfg's hf_hub_filename fetched by timm and converted on load."""
    from huggingface_hub import HfApi

    from .hub_fixtures import hub_env, run_python
    from .hub_server import HubServer

    token = "hf_" + "c" * 32
    with HubServer(tmp_path / "storage", {token: ("csncsn", [])}) as server:
        disable_xet_unless_huggingface(server.url)  # xet storage only works against huggingface.co
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("csncsn/STViT-R")
        api.upload_file(path_or_fileobj=str(release_ckpt), path_in_repo="STViT-R-Swin-S.pth", repo_id="csncsn/STViT-R")
        code = (
            "import timm, torch, stvit_core\n"
            "e = torch.load('tests/fixtures/stvit_r_swin_release_tiny_expected.pt', weights_only=True)\n"
            "m = timm.create_model('stvit_r_swin_small_patch4_window7_224', pretrained=True, num_classes=10,\n"
            "    pretrained_cfg_overlay=dict(num_classes=10), embed_dim=8, num_heads=(2, 4, 8, 16)).eval()\n"
            "with torch.no_grad(): print((m(e['input']) - e['logits']).abs().max().item())\n"
        )
        proc = run_python(code, hub_env(server.url, tmp_path / "home"))
        assert proc.returncode == 0, proc.stderr
        assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-4
        downloads = [path for method, path in server.state.requests if method == "GET" and path.endswith(".pth")]
        assert downloads and all("csncsn/STViT-R/resolve/" in p and p.endswith("/STViT-R-Swin-S.pth") for p in downloads)


def test_feature_maps_keep_their_size_relation():
    """ceil(size / stride) at every stage, also for sizes below one window (the detection layout pads them)."""
    model = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", layout="detection", dynamic_img_size=True,
                              embed_dim=16, num_heads=(1, 2, 4, 8)).eval()
    with torch.no_grad():
        for size in ((33, 47), (64, 64)):
            maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
            assert [tuple(m.shape[-2:]) for m in maps] == [
                (math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]


def test_traced_graphs_keep_one_gather_per_layer(monkeypatch):
    """torch.export (like FX and torch.compile) captures one neighbourhood gather per layer whatever
    gather_chunk_bytes says: splitting is for eager mode, where glibc would map fresh pages for a large one."""
    model = timm.create_model("stvit_r_swin_small_patch4_window7_224", layout="detection", features_only=True,
                              img_size=(96, 160), **TINY_S).eval()
    x = torch.randn(2, 3, 96, 160)

    def gathers(chunk_bytes: int) -> int:
        monkeypatch.setattr(stvit_core.layers.CrossAttention, "gather_chunk_bytes", chunk_bytes)
        program = torch.export.export(model, (x,))
        with torch.no_grad():
            assert max_diff(program.module()(x), model(x)) <= 1e-5
        return sum(node.target == torch.ops.aten.index_select.default for node in program.graph.nodes)

    assert gathers(1) == gathers(2**40) > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_row_gather_equals_index_select_along_the_tokens(batch):
    from stvit_core.layers.attention import _gather_rows

    kv = torch.randn(batch, 37, 12)
    index = torch.randint(0, 37, (5, 11)).reshape(-1)
    assert torch.equal(_gather_rows(kv, index), kv.index_select(1, index))


def test_detection_layout_traces_with_fx():
    """timm's FX feature extraction traces the detection layout (one gather per layer in the graph) and the traced
    module gives the eager output (eager CPU inference gathers in pieces)."""
    from timm.models import create_feature_extractor, get_graph_node_names

    model = timm.create_model("stvit_r_swin_small_patch4_window7_224", layout="detection", num_classes=0,
                              img_size=(96, 160), **TINY_S).eval()
    traced = create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        (out,) = traced(x).values()
        assert max_diff([out], [model(x)]) <= 1e-5
