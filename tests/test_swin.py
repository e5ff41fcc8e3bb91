"""STViT-R-Swin: the official release reproduced, release parameter counts and FLOPs, conversion from timm's
Swin, dense features at several input sizes, and the CLI's answers to bad input."""

from __future__ import annotations

import copy
import gzip
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model

import stvit_core  # noqa: F401  (registers the models)
from stvit_core import load_model
from stvit_core.convert import convert_model
from stvit_core.flops import count_flops
from stvit_core.layers import pool_windows, window_neighbourhood_index
from stvit_core.models.swin import RecoverySwinTransformer, checkpoint_filter_fn

from .conftest import REPO_ROOT, assert_one_line_error, cli_env, run_cli

FIXTURES = Path(__file__).parent / "fixtures"
TINY = dict(embed_dim=16, num_heads=(1, 2, 4, 8), num_classes=10)  # small widths keep the tests fast


@pytest.fixture(scope="module")
def release_ckpt(tmp_path_factory) -> Path:
    """The release-format fixture (gzipped to stay small in git), unpacked to a real .pth file."""
    path = tmp_path_factory.mktemp("release") / "STViT-R-Swin-S-tiny.pth"
    path.write_bytes(gzip.decompress((FIXTURES / "stvit_r_swin_release_tiny.pth.gz").read_bytes()))
    return path


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "stvit_r_swin_release_tiny_expected.pt", weights_only=True)


# --- the official release --------------------------------------------------------------------------------


def test_release_checkpoint_reproduces_official_logits(release_ckpt, expected):
    model = load_model("swin_small", convert=True, checkpoint=release_ckpt).eval()
    assert isinstance(model, RecoverySwinTransformer) and model.stem == "conv"
    with torch.no_grad():
        logits = model(expected["input"])
    assert (logits - expected["logits"]).abs().max().item() <= 1e-4

    # the fixture exercises the semantic path: silencing the STViT layers' LayerScale changes the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ls1.gamma") and ".units." in name:
                p.zero_()
        assert (model(expected["input"]) - expected["logits"]).abs().max().item() > 1e-2


@pytest.mark.slow
def test_release_conversion_through_cli(release_ckpt, expected, tmp_path):
    out = tmp_path / "stvit-r-swin-s"
    proc = run_cli("convert", "swin_small", "--checkpoint", str(release_ckpt), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"tokens_per_window": 9' in proc.stdout
    model = stvit_core.load_model(out).eval()
    with torch.no_grad():
        assert (model(expected["input"]) - expected["logits"]).abs().max().item() <= 1e-4


def test_release_format_with_global_tokens_and_4_tokens_per_window(tmp_path):
    """Second official-code fixture: Swin-T layout, 4 tokens per window, global semantic tokens on (their
    order in the release is row-major over the semantic grid; ours is window by window)."""
    path = tmp_path / "global4.pth"
    path.write_bytes(gzip.decompress((FIXTURES / "stvit_r_swin_t_global4_tiny.pth.gz").read_bytes()))
    exp = torch.load(FIXTURES / "stvit_r_swin_t_global4_tiny_expected.pt", weights_only=True)
    model = load_model("swin_tiny", convert=True, checkpoint=path).eval()
    assert model.semantic_tokens_per_window == 4
    with torch.no_grad():
        assert (model(exp["input"]) - exp["logits"]).abs().max().item() <= 1e-4
        tokens = model.layers[2].units[0].generator.global_semantic_tokens
        tokens.copy_(tokens.flip(1))  # a wrong token order is visible in the logits
        assert (model(exp["input"]) - exp["logits"]).abs().max().item() > 1e-3


def test_release_parameter_counts():
    """Release configuration (conv stem, 9 tokens per window, global tokens off) = the released models."""
    with torch.device("meta"):
        small = timm.create_model("stvit_r_swin_small_patch4_window7_224")
        base = timm.create_model("stvit_r_swin_base_patch4_window7_224")
    assert sum(p.numel() for p in small.parameters()) == 49_625_518
    assert sum(p.numel() for p in base.parameters()) == 87_812_336


def test_flops_saving_swin_small():
    with torch.device("meta"):
        swin = timm.create_model("swin_small_patch4_window7_224")
        ours = timm.create_model("stvit_r_swin_small_patch4_window7_224", semantic_tokens_per_window=9)
        ours4 = timm.create_model("stvit_r_swin_small_patch4_window7_224", semantic_tokens_per_window=4)
    base, g9, g4 = count_flops(swin), count_flops(ours), count_flops(ours4)
    assert 8.6 < base < 8.8  # Swin-S: 8.7 GFLOPs (paper)
    assert g9 <= 0.70 * base  # at least 30% saved (release: 5.83 vs 8.7)
    assert g4 < g9


def test_release_neighbourhood_and_pooling_at_224():
    """At 14x14 the precomputed neighbourhoods are the release's F.unfold(kernel 10, stride 4) windows, and
    pooling the padded map at once equals max-pooling every 7x7 window to 3x3 on its own."""
    positions = torch.arange(196.0).view(1, 1, 14, 14)
    unfolded = F.unfold(positions, kernel_size=10, stride=4).view(100, -1).t().long()
    assert torch.equal(window_neighbourhood_index((14, 14), 7, 10), unfolded)
    x = torch.randn(2, 14, 14, 5)
    windows = x.view(2, 2, 7, 2, 7, 5).permute(0, 1, 3, 5, 2, 4).reshape(-1, 5, 7, 7)
    per_window = F.adaptive_max_pool2d(windows, 3).view(-1, 5, 9).transpose(1, 2).reshape(2, -1, 5)
    assert torch.equal(pool_windows(x, 7, 3), per_window)
    # other sizes: neighbourhoods stay inside the real map (no padding in the keys)
    index = window_neighbourhood_index((16, 20), 7, 10)
    assert index.shape == (9, 100) and int(index.max()) < 16 * 20


# --- conversion from timm's Swin ---------------------------------------------------------------------------


def test_conversion_from_timm_swin_keeps_weights():
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", **TINY)
    model = convert_model(src, semantic_tokens_per_window=4)
    assert model.semantic_tokens_per_window == 4 and model.stem == "patch"
    s, t = src.state_dict(), model.state_dict()
    dim = 64  # stage 3 width
    same = [k for k in s if not k.startswith("layers.2.blocks.") and not k.endswith(("_index", "attn_mask"))]
    for k in same:  # stem, stages 1, 2, 4, stage 3's patch merging, norm, head
        assert torch.equal(s[k], t[k]), k
    unit = "layers.2.units.0."
    for k in ("norm1.weight", "attn.qkv.weight", "attn.relative_position_bias_table", "mlp.fc2.bias"):
        assert torch.equal(s[f"layers.2.blocks.0.{k}"], t[unit + "image_blocks.0." + k])
    parts = {1: "generator.layers.0", 2: "generator.layers.1", 3: "semantic_blocks.0", 4: "semantic_blocks.1",
             5: "recovery"}
    for j, part in parts.items():
        src_block, dst = f"layers.2.blocks.{j}.", f"{unit}{part}."
        for kind in ("weight", "bias"):
            qkv = s[src_block + f"attn.qkv.{kind}"]
            assert torch.equal(t[dst + f"attn.q.{kind}"], qkv[:dim])
            assert torch.equal(t[dst + f"attn.kv.{kind}"], qkv[dim:])
        for k in ("norm1.weight", "norm2.bias", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            assert torch.equal(t[dst + k], s[src_block + k]), dst + k
        assert torch.equal(t[dst + "ls1.gamma"], torch.ones(dim))  # the source block's (implicit) scale
        assert not any(k.startswith(dst) and "relative_position" in k for k in t)  # STViT layers have none
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_checkpoint_of_another_architecture_is_refused():
    model = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", **TINY)
    deit = timm.create_model("deit_tiny_patch16_224", embed_dim=16, num_heads=1, depth=2)
    with pytest.raises(ValueError, match="not a Swin checkpoint"):
        checkpoint_filter_fn(deit.state_dict(), model)
    small = timm.create_model("swin_small_patch4_window7_224", **TINY)
    with pytest.raises(ValueError, match="stage depths"):
        checkpoint_filter_fn(small.state_dict(), model)


# --- dense features ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (256, 320)])
def test_features_only_maps_and_backward(size):
    """timm's Swin convention: features_only gives NHWC stage maps; output_fmt='NCHW' gives the same maps NCHW."""
    kwargs = dict(features_only=True, img_size=size, **{**TINY, "num_classes": 0})
    torch.manual_seed(0)
    net = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", **kwargs)
    torch.manual_seed(0)  # the same weights
    nchw = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", output_fmt="NCHW", **kwargs)
    assert net.feature_info.reduction() == nchw.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, *size, requires_grad=True)
    with torch.no_grad():
        maps = [f.permute(0, 3, 1, 2) for f in net.eval()(x)]
        assert all(torch.equal(a, b) for a, b in zip(maps, nchw.eval()(x)))
    feats = net.train()(x)
    H, W = size
    assert [tuple(f.shape) for f in feats] == [(2, H // 2 ** (i + 2), W // 2 ** (i + 2), 16 * 2 ** i) for i in range(4)]
    sum(f.float().square().mean() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for n, p in net.named_parameters() if "generator.layers.0.attn.q" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_dynamic_size_and_intermediates_agree():
    torch.manual_seed(0)
    model = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", dynamic_img_size=True, **TINY).eval()
    static = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", **TINY).eval()
    static.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        final, maps = static.forward_intermediates(x)
        assert torch.allclose(static.forward_head(final), static(x), atol=1e-6)
        assert torch.allclose(model(x), static(x), atol=1e-6)
        final, maps = model.forward_intermediates(torch.randn(1, 3, 256, 320))
        assert [tuple(m.shape[-2:]) for m in maps] == [(64, 80), (32, 40), (16, 20), (8, 10)]
        assert final.shape == (1, 8, 10, 128)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="does not match the model's"):
        timm.create_model("stvit_r_swin_tiny_patch4_window7_224", **TINY)(torch.randn(1, 3, 240, 224))
    with pytest.raises(ValueError, match="layout must be one of"):
        timm.create_model("stvit_r_swin_tiny_patch4_window7_224", layout="segmentation", **TINY)
    with pytest.raises(ValueError, match="global_semantic_tokens does not apply to layout='detection'"):
        timm.create_model("stvit_r_swin_tiny_patch4_window7_224", layout="detection", global_semantic_tokens=True,
                          **TINY)
    with pytest.raises(ValueError, match="detection_neighbourhoods applies to layout='detection' only"):
        timm.create_model("stvit_r_swin_tiny_patch4_window7_224", detection_neighbourhoods=(14, 21, 27), **TINY)
    with pytest.raises(ValueError, match="do not fit a 7x7 window"):
        timm.create_model("stvit_r_swin_tiny_patch4_window7_224", semantic_tokens_per_window=64, **TINY)
    with pytest.raises(ValueError, match="multiple of 6"):
        timm.create_model("stvit_r_swin_tiny_patch4_window7_224", depths=(2, 2, 4, 2), **TINY)
    glob = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", global_semantic_tokens=True,
                             dynamic_img_size=True, **TINY)
    with pytest.raises(ValueError, match="global semantic tokens"):
        glob(torch.randn(1, 3, 256, 256))


# --- the CLI ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_bad_inputs(tmp_path):
    """A token count the model cannot take, a checkpoint of another architecture: one line (any image size is
    taken: tests/test_any_size.py)."""
    out = str(tmp_path / "out")
    assert_one_line_error(
        run_cli("convert", "swin_tiny", "--no-pretrained", "--tokens-per-window", "5", "--output", out),
        "perfect square")
    deit = tmp_path / "deit.pth"
    torch.save({"model": timm.create_model("deit_tiny_patch16_224", depth=2).state_dict()}, deit)
    assert_one_line_error(run_cli("convert", "swin_tiny", "--checkpoint", str(deit), "--output", out),
                          "does not fit")
    assert not Path(out).exists()


def test_release_checkpoint_of_another_size_is_refused(release_ckpt):
    from stvit_core.errors import CheckpointError, InvalidArgumentError

    with pytest.raises(CheckpointError, match="does not match swin_tiny"):
        load_model("swin_tiny", convert=True, checkpoint=release_ckpt)
    with pytest.raises(InvalidArgumentError, match="Swin converts to STViT-R only"):
        convert_model(timm.create_model("swin_tiny_patch4_window7_224", **TINY), recovery=False)


def test_benchmark_covers_swin():
    from stvit_core.benchmark import BenchmarkSettings, benchmark_pair, models_for_benchmark

    base, ours, name = models_for_benchmark("swin_tiny", semantic_tokens_per_window=4, **TINY)
    assert name.startswith("swin_tiny") and ours.semantic_tokens_per_window == 4
    settings = BenchmarkSettings(batch_size=1, warmup=1, rounds=1, min_round_time=0.01)
    result = benchmark_pair(base, ours, settings)
    assert result["flops_ratio"] > 1.2 and result["stvit"]["img_per_sec"] > 0


def test_set_input_size_keeps_windows_and_matches_a_model_built_for_the_size():
    torch.manual_seed(0)
    model = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", **TINY).eval()
    model.set_input_size(img_size=(256, 320))
    built = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", img_size=(256, 320), **TINY).eval()
    built.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        assert torch.allclose(model(x), built(x), atol=1e-6)
        model.set_input_size(img_size=(250, 317))  # any size: the stem pads to a multiple of 4
        assert model.forward_intermediates(torch.randn(1, 3, 250, 317), intermediates_only=True)[-1].shape[-2:] == (8, 10)


def test_convert_from_a_microsoft_layout_checkpoint_file(tmp_path):
    """A local Swin checkpoint in the original Microsoft layout (downsample at stage ends, ``head.weight``)."""
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", **TINY)
    ms = {}
    for k, v in src.state_dict().items():
        if k.endswith("attn_mask"):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k.replace("head.fc.", "head.")
        ms[k] = v
    path = tmp_path / "swin_tiny_ms.pth"
    torch.save({"model": ms}, path)
    model = load_model("swin_tiny", convert=True, checkpoint=path, **TINY)
    ref = convert_model(src)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_layer_decay_groups_follow_swin_depth():
    """Layer-wise lr decay sees STViT-R-Swin with Swin's depth: one group per replaced block, same count."""
    from timm.models import group_parameters

    ours = timm.create_model("stvit_r_swin_small_patch4_window7_224", **TINY)
    swin = timm.create_model("swin_small_patch4_window7_224", **TINY)
    assert len(group_parameters(ours, ours.group_matcher())) == len(group_parameters(swin, swin.group_matcher()))
    order = ours.group_matcher()
    assert order("layers.2.units.1.image_blocks.0.norm1.weight") < order("layers.2.units.1.generator.layers.0.attn.q.weight") \
        < order("layers.2.units.1.semantic_blocks.1.attn.q.weight") < order("layers.2.units.1.recovery.norm1.weight") \
        < order("layers.2.units.2.image_blocks.0.norm1.weight") < order("layers.3.blocks.0.norm1.weight")


def test_conv_stem_is_conv_bn_hardswish_and_fuse_folds_batchnorm_once():
    """The stem's forward is the released Conv-BN-Hardswish layers, in eval mode too; ``fuse()`` (timm's
    reparameterisation hook) folds each BatchNorm into its convolution once: the same function within float
    rounding, channels-last, activations in place."""
    from stvit_core.models.swin import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(embed_dim=32, strict_img_size=False)
    for m in stem.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial running statistics and affine parameters
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    x = torch.randn(2, 3, 61, 90)
    stem.train()
    assert stem(x).requires_grad and stem.proj[1].num_batches_tracked.item() == 1
    stem.eval()
    unfused = copy.deepcopy(stem)
    with torch.no_grad():
        reference = stem.proj(torch.nn.functional.pad(x, (0, 2, 0, 3))).permute(0, 2, 3, 1)
        assert torch.equal(stem(x), reference)  # unfused: the layers themselves
        assert stem.fuse() is stem and stem.fuse() is stem  # a second call does nothing
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules())
        folded = stem(x)
    assert folded.shape == (2, 16, 23, 32)
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
    # the activations run in place: gradients through the folded stem (eval mode, e.g. attribution) stay right
    # and the caller's image is untouched
    x_copy, xg, xr = x.clone(), x.clone().requires_grad_(), x.clone().requires_grad_()
    stem(xg).square().sum().backward()
    unfused(xr).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-4)
    assert torch.equal(x, x_copy)


def test_reparameterize_model_folds_the_conv_stem():
    """timm's ``reparameterize_model`` finds the stem's ``fuse()``: same logits within float rounding."""
    torch.manual_seed(0)
    model = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", **TINY).eval()
    x = torch.randn(1, 3, 224, 224)
    fused = reparameterize_model(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy is fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def _run_speed_script(*args: str) -> subprocess.CompletedProcess:
    """``benchmarks/swin_backbone_speed.py ARGS`` in a real subprocess from the repository root; must succeed."""
    proc = subprocess.run([sys.executable, "benchmarks/swin_backbone_speed.py", *args], cwd=REPO_ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_backbone_speed_script_runs_every_backbone_at_an_odd_size():
    """benchmarks/swin_backbone_speed.py (docs/benchmarks-swin.md's backbone speed) at a small odd size: one row per backbone,
    speedups and FLOPs ratios against timm's Swin-S (the figures themselves are not checked: no timing in tests)."""
    proc = _run_speed_script("throughput", "--size", "61", "93", "--batch-size", "1", "--rounds", "1", "--warmup", "0",
                             "--cpu-time")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| timm") or line.startswith("| STViT")]
    assert [r.split(" | ")[0] for r in rows] == ["| timm Swin-S (SDPA)", "| STViT-R-Swin-S (conv stem)",
                                                 "| STViT-R-Swin-S (patch stem)", "| STViT-R-Swin-S (detection layout)"]
    assert all(re.search(r"\| \d+\.\d\dx \| \d+\.\d\dx \|$", r) for r in rows), rows


@pytest.mark.slow
def test_backbone_parts_script_times_every_part_of_the_unit():
    """``swin_backbone_speed.py parts`` captures each part's real inputs (hooks on the model's own modules), so it
    keeps working when the parts' arguments change: a row per unit part, GMACs of both models, and the stages."""
    proc = _run_speed_script("parts", "--size", "61", "93", "--batch-size", "1", "--rounds", "1")
    rows = {line.split(" | ")[0][2:]: line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for part in ("Swin block", "generator layer 1", "generator layer 2", "semantic (window)", "semantic (all)",
                 "recovery", "**stage 3**"):
        assert re.search(r"\| [\d.]+ \| \d+\.\d{3} \| [\d.]+ \| \d+\.\d{3} \| \d+\.\d\dx \| \d+\.\d\dx \|$", rows[part])
    assert proc.stdout.count(", whole ") == 4  # per-stage times of every backbone
