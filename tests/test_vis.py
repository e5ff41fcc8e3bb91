"""stvit_core.vis and `stvit vis`: semantic tokens' attention read from real models on real images.

Models are tiny widths of the real architectures (STViT-DeiT with and without class token, STViT-R-DeiT,
STViT-R-Swin at 224 px with its 14x14 stage-3 map and 4 windows); images are the embedded Fashion-MNIST
subset and the shipped photo of Chelsea the cat (stvit_core/data/detection_backgrounds, CC0).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.data import build_transform, embedded_dataset_path, model_data_config
from stvit_core.errors import InvalidArgumentError
from stvit_core.layers import CrossAttention, WindowSemanticTokenGenerator
from stvit_core.vis import (
    attention_on_region,
    check_vis_arguments,
    contact_sheet_size,
    cross_attention_probabilities,
    figure_size,
    image_sources,
    semantic_token_attention,
    semantic_token_generators,
    token_partition,
    visualise_images,
)
from stvit_core.vis.attention import _recorded_calls
from stvit_core.vis.draw import MARGIN, PANEL, TITLE, _fit, _partition_panel

from .train_utils import assert_one_line_error, cli, cli_in_process, converted_model_dir, env, tiny_deit

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "stvit_core" / "data" / "detection_backgrounds" / "chelsea.jpg"
DEIT = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=2, num_image_blocks=2, num_classes=10)


def _deit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("stvit_deit_tiny_patch16_224", **{**DEIT, "num_semantic_tokens": 16, **kw}).eval()


def _deit_r(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=2, num_classes=10, num_semantic_tokens=4)
    return timm.create_model("stvit_r_deit_tiny_patch16_224", **{**args, **kw}).eval()


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("stvit_r_swin_tiny_patch4_window7_224", embed_dim=24, num_heads=(1, 2, 4, 4),
                             depths=(1, 1, 6, 1), num_classes=10).eval()


MODELS = {"deit-class-token": _deit, "deit-avg": lambda: _deit(global_pool="avg"), "deit-r": _deit_r, "swin": _swin}


def _fashion_mnist(n: int = 6) -> list:
    folders = sorted((embedded_dataset_path() / "val").iterdir())
    return [sorted(folder.iterdir())[0] for folder in folders[:n]]


def _inputs(model: torch.nn.Module, paths) -> torch.Tensor:
    transform = build_transform(model_data_config(model), training=False)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_images(request):
    model = MODELS[request.param]()
    return request.param, model, _inputs(model, [*_fashion_mnist(3), PHOTO])


def _full_probabilities(model, images, layer, unit):
    """The recorded call of the chosen layer and its probabilities over every key (not just image tokens)."""
    generator = semantic_token_generators(model)[unit or 0]
    attn = generator.layers[layer].attn
    with _recorded_calls({"attn": attn}) as calls, torch.no_grad():
        model(images)
    arguments = calls["attn"]["arguments"]
    probs, output = cross_attention_probabilities(attn, arguments["x"], arguments["context"],
                                                  arguments["context_index"])
    return attn, arguments, probs, output, calls["attn"]["output"]


def test_every_layer_reproduces_the_fused_output_and_keeps_the_forward(model_and_images):
    """The explicit softmax gives what the fused path gave (1e-5), and the model is the same afterwards:
    same output, fused attention still on, no hook left anywhere."""
    name, model, images = model_and_images
    with torch.no_grad():
        reference = model(images)
    units = len(semantic_token_generators(model))
    for unit in range(units):
        for layer in range(len(semantic_token_generators(model)[unit].layers)):
            attn, _, _, recomputed, fused = _full_probabilities(model, images, layer, unit if units > 1 else None)
            assert attn.fused_attn, "the comparison is with the fused SDPA path"
            torch.testing.assert_close(recomputed, fused, atol=1e-5, rtol=1e-5)
            semantic_token_attention(model, images, layer=layer, unit=unit if name in ("deit-r", "swin") else None)
    with torch.no_grad():
        assert torch.equal(model(images), reference)
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks), module
    assert not model.training


def test_attention_sums_to_its_share_of_image_tokens(model_and_images):
    """Each token's map sums to 1 minus its attention on keys that are not image tokens (no renormalisation);
    exactly 1 where every key is an image token."""
    name, model, images = model_and_images
    generators = semantic_token_generators(model)
    unit = len(generators) - 1 if name in ("deit-r", "swin") else None
    for layer in range(len(generators[unit or 0].layers)):
        attn_map = semantic_token_attention(model, images, layer=layer, unit=unit)
        _, arguments, probs, _, _ = _full_probabilities(model, images, layer, unit)
        generator = generators[unit or 0]
        prefix = getattr(generator, "num_prefix_tokens", 0)
        B, G, _, T, K = probs.shape
        n_image = attn_map.shape[-2] * attn_map.shape[-1]
        index = torch.arange(K)[None] if arguments["context_index"] is None else arguments["context_index"]
        not_image = (index < arguments["context"].shape[1] - n_image).float()[None, :, None, :]
        elsewhere = (probs.mean(2) * not_image).sum(-1).reshape(B, G * T)[:, prefix:]
        sums = attn_map.sum((-2, -1))
        torch.testing.assert_close(sums + elsewhere, torch.ones_like(sums), atol=1e-5, rtol=0)
        assert attn_map.shape[1] == (generator.num_semantic_tokens if prefix or name.startswith("deit") else 36)
        if name == "deit-avg" and layer == 0:  # keys: the image tokens only
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        assert (attn_map >= 0).all()


def test_swin_local_tokens_land_on_their_window_neighbourhood():
    """STViT-R-Swin, local layer: 36 tokens (4 windows x 9), each non-zero exactly on its window's 10x10
    neighbourhood of the 14x14 map; the global layer covers the whole map."""
    model = _swin()
    images = _inputs(model, [PHOTO, *_fashion_mnist(1)])
    local = semantic_token_attention(model, images, layer=0)
    assert local.shape == (2, 36, 14, 14)
    generator = semantic_token_generators(model)[0]
    assert isinstance(generator, WindowSemanticTokenGenerator)
    for window in range(4):
        row, col = divmod(window, 2)
        expected = torch.zeros(14, 14, dtype=torch.bool)
        rows = slice(0, 10) if row == 0 else slice(4, 14)
        cols = slice(0, 10) if col == 0 else slice(4, 14)
        expected[rows, cols] = True
        for token in range(window * 9, window * 9 + 9):
            assert torch.equal(local[:, token] > 0, expected.expand(2, 14, 14)), (window, token)
    assert (semantic_token_attention(model, images, layer=1) > 0).all()


def test_partition_covers_every_image_token(model_and_images):
    _, model, images = model_and_images
    attn = semantic_token_attention(model, images)
    partition = token_partition(attn)
    assert partition.dtype == torch.long and partition.shape == (attn.shape[0], *attn.shape[2:])
    assert ((partition >= 0) & (partition < attn.shape[1])).all()
    chosen = attn.gather(1, partition[:, None])[:, 0]
    assert torch.equal(chosen, attn.amax(1)), "every image token goes to the token that attends to it most"


def test_probabilities_with_a_mask_match_sdpa():
    """The explicit softmax follows scaled_dot_product_attention's mask convention (boolean and additive)."""
    torch.manual_seed(0)
    attn = CrossAttention(32, num_heads=4).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    keep = torch.rand(2, 4, 5, 9) > 0.3
    keep[..., 0] = True
    q = attn.q(x).reshape(2, 5, 4, 8).transpose(1, 2)
    k, v = attn.kv(context).reshape(2, 9, 2, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    for mask in (keep, torch.randn(2, 4, 5, 9)):
        reference = attn.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 5, 32))
        probs, output = cross_attention_probabilities(attn, x, context, attn_mask=mask)
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 1, 4, 5))


def test_layer_and_unit_choices_are_checked():
    deit, deit_r = _deit(), _deit_r()
    assert check_vis_arguments(deit) == (1, None)
    assert check_vis_arguments(deit_r) == (1, 1)
    assert check_vis_arguments(deit_r, layer=0, unit=0) == (0, 0)
    with pytest.raises(InvalidArgumentError, match="layer=2 is out of range"):
        check_vis_arguments(deit, layer=2)
    with pytest.raises(InvalidArgumentError, match="unit=0 cannot apply"):
        check_vis_arguments(deit, unit=0)
    with pytest.raises(InvalidArgumentError, match="unit=2 is out of range"):
        check_vis_arguments(deit_r, unit=2)
    plain = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    with pytest.raises(InvalidArgumentError, match="not an STViT model"):
        semantic_token_attention(plain, torch.zeros(1, 3, 32, 32))
    # units differ: unit 0 and unit 1 of STViT-R-DeiT are different generators
    images = _inputs(deit_r, _fashion_mnist(2))
    assert not torch.equal(semantic_token_attention(deit_r, images, unit=0), semantic_token_attention(deit_r, images))


def test_attention_on_region_against_its_share():
    attn = torch.zeros(1, 2, 2, 2)
    attn[0, 0, 0, 0] = 0.5  # token 0: all of its (half) image attention on the top-left token
    attn[0, 1] = 0.25  # token 1: spread evenly
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True  # the region: the top-left token's pixels
    mass, share = attention_on_region(attn, mask)
    torch.testing.assert_close(share, torch.tensor([0.25]))
    torch.testing.assert_close(mass, torch.tensor([(0.5 + 0.25) / 1.5]))


def test_mean_fill_paints_each_region_with_its_mean_colour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    partition = np.array([[0, 1], [1, 1]])
    panel = _partition_panel(image, partition, "mean", np.zeros((2, 3), np.uint8))
    region0 = image[:4, :4].reshape(-1, 3).mean(0).round()
    np.testing.assert_array_equal(panel[1, 1], region0)  # inside the region, off its outline
    assert (panel[:, 4] == 255).all() or (panel[4, :4] == 255).all(), "regions are outlined"


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        png.load()
        return np.asarray(png.convert("RGB"))


@pytest.mark.parametrize("name", ["deit-class-token", "swin"])
def test_figures_decode_at_their_size_and_show_the_model_input(name, tmp_path):
    model = MODELS[name]()
    sources, problems = image_sources([*_fashion_mnist(2), PHOTO])
    assert not problems
    report = visualise_images(model, sources, tmp_path / "vis", sheet=True, fill="mean")
    tokens = 16 if name.startswith("deit") else 36
    assert report["tokens"] == tokens and len(report["files"]) == 3 and not report["failed"]
    transform = build_transform(model_data_config(model), training=False)
    config = model_data_config(model)
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    for source, file in zip(sources, report["files"]):
        figure = _decoded(Path(file))
        assert figure.shape[:2][::-1] == figure_size(tokens)
        seen = transform(Image.open(source.path).convert("RGB")) * std + mean
        seen = (seen.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        shown = _fit(seen, PANEL)
        h, w = shown.shape[:2]
        top, left = TITLE + MARGIN + (PANEL - h) // 2, MARGIN + (PANEL - w) // 2
        np.testing.assert_array_equal(figure[top:top + h, left:left + w], shown)
    sheet = _decoded(Path(report["sheet"]))
    assert sheet.shape[:2][::-1] == contact_sheet_size(3)
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == sorted(
        ["contact-sheet.png", *(f"{s.name}.png" for s in sources)]), "no temporary file left"


def test_image_sources_names_and_problems(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for sub in ("a", "b"):
        Image.new("RGB", (8, 8)).save(folder / sub / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "contact-sheet.png")
    (tmp_path / "empty").mkdir()
    sources, problems = image_sources([folder, tmp_path / "contact-sheet.png", tmp_path / "empty",
                                       tmp_path / "missing.png", folder / "a" / "x.png"])
    assert [s.name for s in sources] == ["a_x", "b_x", "contact-sheet-2", "x"]
    assert len(problems) == 2 and "no images in" in problems[0] and "missing.png" in problems[1]


@pytest.mark.slow
def test_cli_draws_the_readable_images_and_names_the_others(tmp_path):
    """One bad file among good ones: its line on stderr, the others drawn, exit 1, --json lists what was
    written (a real process, not a TTY: no progress bar)."""
    from .hub_fixtures import make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    images = _fashion_mnist(3)
    proc = cli(["vis", str(model), *map(str, images), str(bad), str(PHOTO), "--output", str(tmp_path / "out"),
                "--json", "--sheet"], fresh_process=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"Error: cannot read image {bad}: cannot identify image file {str(bad)!r}"]
    report = json.loads(proc.stdout)
    assert [Path(f).name for f in report["files"]] == [*(f"{p.stem}.png" for p in images), "chelsea.png"]
    assert report["failed"] == [{"image": str(bad), "error": proc.stderr.strip()[len("Error: "):]}]
    assert report["tokens"] == 4 and report["layer"] == 1 and report["unit"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [Path(f).name for f in report["files"]] + ["contact-sheet.png"])


def test_cli_refuses_weights_and_tokens_that_cannot_apply(tmp_path, monkeypatch):
    """A saved model has its own weights and tokens (--no-pretrained used to draw a random model); --checkpoint
    and --no-pretrained exclude each other; errors name what the user typed, as typed. Nothing is written."""
    model_dir = converted_model_dir(tmp_path / "model", tokens=4)
    weights = tmp_path / "dtiny.pth"
    torch.save(tiny_deit().state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.onnx").write_bytes(b"onnx")  # an exported file is no model to draw
    out = tmp_path / "out"
    image = str(_fashion_mnist(1)[0])
    for args, fragment in [
        ([str(model_dir), "--no-pretrained"], f"--no-pretrained cannot apply to a saved model ({model_dir}): it has its own weights"),
        ([str(model_dir), "--checkpoint", str(weights)], f"--checkpoint {weights} cannot apply to a saved model ({model_dir})"),
        (["deit_tiny", "--no-pretrained", "--checkpoint", str(weights)],
         "--checkpoint and --no-pretrained exclude each other"),
        ([str(model_dir), "--tokens", "16"], "--tokens 16 cannot apply to a saved model"),
        (["t.onnx"], "Error: t.onnx is a file, not a model directory"),
    ]:
        r = cli_in_process(["vis", args[0], image, "-o", str(out), *args[1:]])
        assert_one_line_error(r, fragment)
        # a refused option is exit 2; a path that is not a model directory is exit 1, as in every command
        assert "cannot build" not in r.stderr and r.returncode == (1 if args[0] == "t.onnx" else 2)
    assert not out.exists()


def test_help_examples_name_real_folders():
    """The example's embedded folder exists under that exact name (class folders are lower case)."""
    text = cli_in_process(["vis", "--help"]).stdout
    folders = re.findall(r"stvit_core/data/\S+", text)
    assert folders and all((ROOT / folder).is_dir() for folder in folders), folders


def test_cli_swin_unit_and_layer(tmp_path):
    from stvit_core import save_model

    model_dir = save_model(_swin(), tmp_path / "swin")
    result = cli_in_process(["vis", str(model_dir), str(PHOTO), "-o", str(tmp_path / "out"), "--unit", "0",
                             "--layer", "0", "--json", "--fill", "mean"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["unit"], report["layer"], report["tokens"], report["grid_size"]) == (0, 0, 36, [14, 14])
    assert _decoded(Path(report["files"][0])).shape[:2][::-1] == figure_size(36)
    result = cli_in_process(["vis", str(model_dir), str(PHOTO), "-o", str(tmp_path / "out2"), "--unit", "1"])
    assert result.returncode == 2 and "--unit 1 is out of range" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_cli_refuses_an_output_folder_with_files_unless_force(tmp_path):
    """As every command: an existing output is refused (one line, exit 1, before the model is built) and
    replaced with --force, the previous run's files gone; an empty folder is used as it is."""
    from stvit_core import save_model

    model_dir = save_model(_deit(), tmp_path / "deit")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.png").write_bytes(b"a previous run's figure")
    args = ["vis", str(model_dir), str(PHOTO), "-o", str(out)]
    assert_one_line_error(cli_in_process(args), f"Error: {out} already exists (use --force to overwrite)")
    assert cli_in_process(args).returncode == 1 and sorted(p.name for p in out.iterdir()) == ["old.png"]
    result = cli_in_process([*args, "--force"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["chelsea.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli_in_process(["vis", str(model_dir), str(PHOTO), "-o", str(empty)])
    assert result.returncode == 0 and sorted(p.name for p in empty.iterdir()) == ["chelsea.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deit", "empty", "out"], "no temporary folder left"


def test_nothing_drawn_leaves_no_folder(tmp_path):
    """Every image unreadable: no output folder, nor the parents made for it; an existing one is kept."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    sources, _ = image_sources([bad])
    report = visualise_images(_deit(), sources, tmp_path / "a" / "b" / "out")
    assert report["files"] == [] and len(report["failed"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png"]
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.png").write_bytes(b"old")
    visualise_images(_deit(), sources, tmp_path / "kept", force=True)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["old.png"]


DOCS = ROOT / "docs" / "visualise.md"


def _doc_blocks() -> list:
    return re.findall(r"```(bash|python)\n(.*?)```", DOCS.read_text(), re.S)


def _tiny_fashion_mnist(folder: Path) -> Path:
    """7 training and 3 validation images per class of the embedded subset (one batch of 64 to train on)."""
    for split, count in (("train", 7), ("val", 3)):
        for class_dir in sorted((embedded_dataset_path() / split).iterdir()):
            (folder / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, folder / split / class_dir.name / image.name)
    return folder


@pytest.mark.slow
def test_docs_blocks_run_and_the_object_mass_check_produces_its_numbers(tmp_path, monkeypatch):
    """Every code block of docs/visualise.md, as written, in a scratch folder that mirrors the repository's
    relative paths (stvit_core/, benchmarks/, docs/images/); `stvit` and `python` are this interpreter. One
    change: the check's fine-tune is 1 epoch on 70 images (--epochs 1 --data TINY appended), which also runs
    benchmarks/vis_object_mass.py end to end: it must produce its table and JSON (the values are in the docs)."""
    for name in ("stvit_core", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "docs" / "images").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, run in (("stvit", f"{sys.executable} -m stvit_cli"), ("python", sys.executable)):
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    tiny = _tiny_fashion_mnist(tmp_path / "tiny")
    environment = {**env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    blocks = _doc_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash"]
    monkeypatch.chdir(tmp_path)
    outputs = []
    for lang, code in blocks:
        if lang == "python":
            exec(compile(code, str(DOCS), "exec"), {})
            continue
        code = code.replace("--work runs/vis-check", f"--work runs/vis-check --epochs 1 --data {tiny}")
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=environment,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert [Path(f).name for f in json.loads(outputs[0])["files"]] == ["chelsea.png", "val_00018.png"]
    assert (tmp_path / "runs" / "vis" / "contact-sheet.png").is_file()
    result = json.loads((tmp_path / "runs" / "vis-check" / "vis_object_mass.json").read_text())
    assert [(r["model"], r["layer"]) for r in result["rows"]] == [
        ("before fine-tuning", 0), ("after fine-tuning", 0), ("before fine-tuning", 1), ("after fine-tuning", 1)]
    for row in result["rows"]:
        assert 0 < row["object_share"] < 1 and 0 <= row["mass_on_objects"] <= 1 and row["images"] == 30
        assert 0.5 <= row["partition_purity"] <= 1 and 1 <= row["regions"] <= 16
    assert outputs[1].count("| before fine-tuning |") == 2 and "attention mass on objects" in outputs[1]
    assert _decoded(tmp_path / "docs" / "images" / "vis-fashion-mnist.png").shape[:2][::-1] == figure_size(16)


def test_docs_picture_is_the_commands_figure():
    """The committed picture is a figure `stvit vis` draws (its size for 16 tokens) and stays small."""
    picture = ROOT / "docs" / "images" / "vis-fashion-mnist.png"
    assert picture.stat().st_size < 300_000
    assert _decoded(picture).shape[:2][::-1] == figure_size(16)
    assert "docs/images/vis-fashion-mnist.png" in (ROOT / "README.md").read_text()
