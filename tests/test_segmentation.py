"""Semantic segmentation: smp's UPerNet and FPN on every STViT-R encoder at a size that is no whole number of
windows, the refusal of STViT (non-R) encoders, pretrained weights reaching the encoder, the pasted-objects masks,
the documented examples (building, training to an mIoU far above the untrained one's, ONNX export matching
onnxruntime) and the benchmark script's training job."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

import stvit_core  # noqa: F401  (registers the models)
from stvit_core import save_model
from stvit_core.detection_data import PastedObjectsDataset
from stvit_core.errors import InvalidArgumentError, StvitError
from stvit_core.segmentation import (
    PastedObjectsSegmentation,
    PyramidEncoder,
    SimpleFeaturePyramid,
    create_segmentation_model,
    evaluate_segmentation,
    train_segmentation,
)

from .conftest import REPO_ROOT
from .test_benchmark_scripts import load_script
from .test_detection import doc_example

FIXTURES = REPO_ROOT / "tests" / "fixtures"
STVIT_R = sorted(timm.list_models("stvit_r_*"))
# every STViT-R model in both Swin layouts (narrow widths, the model's depths and layout); Swin-S/B slow
ENCODERS = [pytest.param(name, kwargs, marks=pytest.mark.slow if "swin" in name and "tiny" not in name else ())
            for name in STVIT_R for kwargs in ([{}, {"layout": "detection"}] if "swin" in name else [{}])]
TINY_SWIN = dict(embed_dim=32, num_heads=(1, 2, 4, 8))
NARROW_VIT = dict(embed_dim=48, num_heads=3)
SMALL_DECODERS = {"UPerNet": dict(decoder_channels=32), "FPN": dict(decoder_pyramid_channels=64,
                                                                     decoder_segmentation_channels=32)}
CLASSES = ["trouser", "bag", "sneaker", "dress", "sandal"]


@pytest.mark.parametrize("name, kwargs", ENCODERS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()) or "default")
def test_upernet_and_fpn_on_every_stvit_r_encoder_give_per_pixel_logits(name, kwargs):
    # 352x544: stage-3 maps of 22x34, no whole number of 7x7 windows
    kwargs = dict(kwargs, **(TINY_SWIN if "swin" in name else NARROW_VIT))
    torch.manual_seed(0)
    for arch in ("UPerNet", "FPN"):
        model = create_segmentation_model(arch, name, 7, model_kwargs=kwargs, **SMALL_DECODERS[arch]).eval()
        assert isinstance(model.encoder, PyramidEncoder) == ("swin" not in name)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 352, 544))
        assert out.shape == (1, 7, 352, 544) and torch.isfinite(out).all()


def test_smp_takes_stvit_r_swin_as_it_is_and_the_values_are_finite():
    torch.manual_seed(0)
    model = smp.UPerNet(encoder_name="tu-stvit_r_swin_tiny_patch4_window7_224", encoder_weights=None, classes=3,
                        dynamic_img_size=True, decoder_channels=32, **TINY_SWIN).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 160))
    assert out.shape == (1, 3, 96, 160) and torch.isfinite(out).all()


def test_simple_feature_pyramid_strides_and_channels():
    neck = SimpleFeaturePyramid(64)
    maps = neck(torch.randn(2, 64, 5, 7))
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 20, 28), (32, 10, 14), (64, 5, 7), (64, 3, 4)]
    assert neck.channels == [16, 32, 64, 64]


@pytest.mark.parametrize("name", ["stvit_deit_tiny_patch16_224", "stvit_vit_patch16_224"])
def test_stvit_without_recovery_is_refused_in_one_line(name):
    with pytest.raises(InvalidArgumentError) as info:
        create_segmentation_model("UPerNet", name, 5)
    message = str(info.value)
    assert isinstance(info.value, StvitError) and "\n" not in message
    assert name in message and "STViT-R" in message


def test_encoders_without_a_usable_pyramid_and_bad_encoder_arguments_are_one_line_errors():
    with pytest.raises(InvalidArgumentError, match="strides"):
        create_segmentation_model("UPerNet", "resnet18", 5, model_kwargs={"output_stride": 8})
    with pytest.raises(InvalidArgumentError, match="cannot build"):
        create_segmentation_model("UPerNet", "stvit_r_deit_tiny_patch16_224", 5, model_kwargs={"stem": "conv"})
    with torch.device("meta"), pytest.raises(InvalidArgumentError, match="depth 3-5"):
        create_segmentation_model("UPerNet", "stvit_r_deit_tiny_patch16_224", 5, encoder_depth=2)


@pytest.mark.parametrize("name, kwargs", [
    ("stvit_r_swin_tiny_patch4_window7_224", TINY_SWIN),
    ("stvit_r_deit_tiny_patch16_224", dict(depth=12, embed_dim=48, num_heads=3)),
])
def test_pretrained_weights_reach_the_encoder(tmp_path, name, kwargs):
    # a model directory's weights (what pretrained=True loads through timm, as for the release's Hub weights)
    torch.manual_seed(1)
    source = timm.create_model(name, **kwargs)
    save_model(source, tmp_path / "model")
    model = create_segmentation_model("UPerNet", f"local-dir:{tmp_path / 'model'}", 5, pretrained=True)
    expected = dict(source.named_parameters())
    loaded = dict(model.encoder.model.named_parameters(prefix="", remove_duplicate=True))
    # timm's feature wrappers hold the model (getter) or flatten its stages (smp's default: layers_0...)
    loaded = {re.sub(r"^layers_(\d+)", r"layers.\1", n.removeprefix("model.")): p for n, p in loaded.items()}
    assert len(loaded) > 10 and set(loaded) <= set(expected)
    for n, p in loaded.items():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["classification", "detection"])
def test_the_release_imagenet_weights_reach_the_encoder(tmp_path, layout):
    # timm's pretrained machinery pointed at a local copy of the release file (the Hub download itself is tested in
    # test_detection_backbone.py): smp's encoder holds exactly what timm loads for the same name
    release = tmp_path / "STViT-R-Swin-S.pth"
    release.write_bytes(gzip.decompress((FIXTURES / "stvit_r_swin_release_tiny.pth.gz").read_bytes()))
    kwargs = dict(embed_dim=8, num_heads=(2, 4, 8, 16), layout=layout,  # the fixture's width
                  pretrained_cfg_overlay=dict(file=str(release)))
    name = "stvit_r_swin_small_patch4_window7_224"
    model = create_segmentation_model("UPerNet", name, 5, pretrained=True, model_kwargs=kwargs)
    expected = timm.create_model(name, pretrained=True, num_classes=10,  # the fixture's head
                                 **dict(kwargs, pretrained_cfg_overlay=dict(file=str(release), num_classes=10)))
    expected = expected.state_dict()
    loaded = {re.sub(r"^layers_(\d+)", r"layers.\1", n.removeprefix("model.")): v  # timm's feature wrappers
              for n, v in model.encoder.model.state_dict().items()}
    assert len(loaded) > 100 and set(loaded) <= set(expected)
    assert [n for n, v in loaded.items() if not torch.equal(v, expected[n])] == []


def test_pasted_objects_masks_are_the_detection_masks():
    seg = PastedObjectsSegmentation("val", 4, 96, classes=CLASSES, object_size=(24, 48), seed=2)
    det = PastedObjectsDataset("val", 4, 96, classes=CLASSES, object_size=(24, 48), seed=2)
    assert seg.num_classes == 6 and seg.classes[0] == "background"
    for i in range(4):
        image, mask = seg[i]
        det_image, target = det[i]
        assert image.shape == (3, 96, 96) and mask.shape == (96, 96) and mask.dtype == torch.int64
        torch.testing.assert_close(image * seg.std + seg.mean, det_image)
        for item_mask, label in zip(target["masks"], target["labels"]):
            assert (mask[item_mask.bool()] == label).float().mean() > 0.8  # a later item may cover a corner
        assert (mask > 0).sum() == (target["masks"].sum(0) > 0).sum()
        torch.testing.assert_close(mask, seg[i][1])


def test_evaluate_segmentation_scores_perfect_and_constant_predictions():
    data = PastedObjectsSegmentation("val", 4, 64, classes=CLASSES, object_size=(16, 32))

    class Oracle(torch.nn.Module):
        def __init__(self, masks, constant=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.masks, self.constant = masks, constant

        def forward(self, x):
            masks = self.masks[: x.shape[0]] if self.constant is None else torch.full_like(self.masks[: x.shape[0]],
                                                                                           self.constant)
            return torch.nn.functional.one_hot(masks, 6).permute(0, 3, 1, 2).float()

    masks = torch.stack([data[i][1] for i in range(4)])
    perfect = evaluate_segmentation(Oracle(masks), data, batch_size=4)
    assert perfect["miou"] == pytest.approx(1.0) and perfect["pixel_accuracy"] == pytest.approx(1.0)
    background = evaluate_segmentation(Oracle(masks, 0), data, batch_size=4)
    present = masks.unique().tolist()
    assert [background["iou"][c] for c in present] == [pytest.approx(float((masks == 0).float().mean()))] + \
        [0.0] * (len(present) - 1)
    assert background["pixel_accuracy"] == pytest.approx(float((masks == 0).float().mean()))


def test_train_segmentation_lowers_the_loss_and_is_repeatable():
    data = PastedObjectsSegmentation("train", 16, 64, classes=CLASSES, object_size=(16, 32))

    def run():
        torch.manual_seed(0)
        model = create_segmentation_model("FPN", "stvit_r_swin_tiny_patch4_window7_224", data.num_classes,
                                          decoder_segmentation_channels=32, decoder_pyramid_channels=32,
                                          model_kwargs=dict(embed_dim=16, num_heads=(1, 2, 4, 8)))
        return train_segmentation(model, data, steps=6, batch_size=4, lr=3e-3)

    first = run()
    assert first == run() and len(first) == 6
    assert first[-1] < first[0]
    with pytest.raises(InvalidArgumentError):
        train_segmentation(torch.nn.Conv2d(3, 6, 1), data, steps=0)


def test_documented_build_example_runs():
    exec(compile(doc_example("segmentation-build"), "docs/dense-tasks.md", "exec"), {"__name__": "__doc__"})


@pytest.mark.slow  # 128 AdamW steps of a small STViT-R-Swin UPerNet: about 40 s of CPU time on one thread
def test_documented_training_example_learns_far_above_untrained():
    """The example in docs/dense-tasks.md, run as written: two epochs of 512 64x64 images (128 steps at batch 8)
    of UPerNet (decoder width 64) on STViT-R-Swin-T at width 32.

    Measured (2026-12-06, 2-core AMD EPYC VM, torch 2.14.1, one thread, 38 s of CPU time): validation mIoU
    0.024 untrained (pixel accuracy 0.08), 0.230 after training (background IoU 0.94, the five item classes
    0.00-0.16, pixel accuracy 0.91); a 120-step run of the same model with timm's AdamW and a cosine schedule
    reached 0.223. The bar, 0.15, is six times the untrained model's and leaves a third of the trained one's
    margin for other machines' floating point and thread counts.
    """
    namespace = {"__name__": "__doc__"}
    exec(compile(doc_example("segmentation-train"), "docs/dense-tasks.md", "exec"), namespace)
    untrained, trained = namespace["untrained"], namespace["trained"]
    assert untrained["miou"] < 0.08
    assert trained["miou"] > 0.15, trained


@pytest.mark.slow  # exports a Swin-T UPerNet at 512x512 with torch.export and runs it in onnxruntime
def test_documented_onnx_export_matches_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc__"}
    exec(compile(doc_example("segmentation-export"), "docs/dense-tasks.md", "exec"), namespace)
    assert namespace["error"] < 1e-4
    assert (tmp_path / "upernet.onnx").is_file()


@pytest.mark.slow  # trains two tiny UPerNets for a few steps
def test_benchmark_script_trains_both_models(tmp_path, capsys):
    out = tmp_path / "curves.json"
    load_script("segmentation").main(["train", "--steps", "4", "--eval-every", "2", "--size", "64", "--embed-dim",
                                      "32", "--num-images", "32", "--batch-size", "4", "--output", str(out)])
    curves = json.loads(out.read_text())["curves"]
    assert set(curves) == {"Swin-T (timm)", "STViT-R-Swin-T"}
    assert [step for step, *_ in curves["STViT-R-Swin-T"]] == [0, 2, 4]
    assert all(0 <= miou <= 1 for c in curves.values() for _, miou, _ in c)
    assert "| step |" in capsys.readouterr().out


@pytest.mark.slow  # counts six backbones and six UPerNets at 512x512 on the meta device: about 35 s
def test_table_14_in_the_docs_is_what_the_script_prints(capsys):
    load_script("segmentation").main(["flops"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| Swin", "| STViT"))]
    assert len(rows) == 6
    docs = (REPO_ROOT / "docs" / "dense-tasks.md").read_text()
    assert [row for row in rows if row not in docs] == []
