"""Detection with STViT-R backbones: the pasted-objects set, torchvision detectors over timm feature maps (odd
image sizes, Mask R-CNN, fixed-size models), COCO box mAP, the training script, and the documented example that
trains a small STViT-R-Swin detector to a box mAP@0.5 far above the untrained one's."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import timm
import torch

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.detection import FeaturePyramidBackbone, build_detector, coco_box_map
from stvit_core.detection_data import BACKGROUNDS_PATH, PastedObjectsDataset, detection_collate
from stvit_core.errors import InvalidArgumentError

from .conftest import REPO_ROOT, cli_env

TINY = dict(embed_dim=16, num_heads=(1, 2, 4, 8))  # small widths keep the tests fast
SMALL_HEADS = dict(fpn_channels=32, representation_size=64, min_size=96, max_size=160)
ODD_IMAGES = [(3, 101, 157), (3, 130, 77)]


def doc_example(name: str) -> str:
    """The Python block that follows ``<!-- example: name -->`` in docs/dense-tasks.md."""
    text = (REPO_ROOT / "docs" / "dense-tasks.md").read_text()
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/dense-tasks.md has no example {name!r}"
    return match.group(1)


# --- the data --------------------------------------------------------------------------------------------


def test_pasted_objects_are_deterministic_with_exact_boxes_and_masks():
    data = PastedObjectsDataset("train", num_images=6, seed=3)
    again = PastedObjectsDataset("train", num_images=6, seed=3)
    other = PastedObjectsDataset("train", num_images=6, seed=4)
    assert data.num_classes == 11 and (BACKGROUNDS_PATH / "NOTICE").is_file()
    sizes = set()
    for i in range(len(data)):
        image, target = data[i]
        image2, target2 = again[i]
        assert torch.equal(image, image2) and all(torch.equal(target[k], target2[k]) for k in target)
        assert not torch.equal(image, other[i][0]) or image.shape != other[i][0].shape
        _, H, W = image.shape
        sizes.add((H, W))
        assert 128 <= H <= 192 and 128 <= W <= 192 and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
        assert 1 <= len(boxes) <= 3 and masks.shape == (len(boxes), H, W)
        assert ((labels >= 1) & (labels <= 10)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()
        for box, mask in zip(boxes.long().tolist(), masks):
            # the mask lies inside its box, and the box is tight around the visible item
            x1, y1, x2, y2 = box
            assert mask.sum() > 0 and mask.sum() == mask[y1:y2, x1:x2].sum()
    assert len(sizes) > 1  # odd, varying sizes


def test_pasted_objects_class_subset_and_bad_arguments():
    data = PastedObjectsDataset("val", num_images=4, classes=["bag", "trouser"])
    assert data.num_classes == 3 and all(data[i][1]["labels"].max() <= 2 for i in range(4))
    with pytest.raises(InvalidArgumentError, match="unknown Fashion-MNIST classes"):
        PastedObjectsDataset(classes=["cat"])
    with pytest.raises(InvalidArgumentError, match="object_size"):
        PastedObjectsDataset(image_size=64, object_size=(32, 96))
    with pytest.raises(IndexError):
        data[4]


# --- building and running detectors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stvit_r_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224"])
def test_detector_runs_on_odd_image_sizes(name):
    torch.manual_seed(0)
    detector = build_detector(name, 5, model_kwargs=TINY, **SMALL_HEADS).eval()
    backbone = detector.backbone
    assert isinstance(backbone, FeaturePyramidBackbone) and backbone.strides == [4, 8, 16, 32, 64]
    images = [torch.rand(*s) for s in ODD_IMAGES]
    with torch.no_grad():
        batch, _ = detector.transform(images)
        padded = batch.tensors.shape[-2:]
        assert padded[0] % 32 == 0 and padded[1] % 32 == 0  # torchvision's default size_divisible
        levels = backbone(batch.tensors)
        assert list(levels) == ["0", "1", "2", "3", "pool"]
        for level, stride in zip(levels.values(), backbone.strides):
            assert level.shape == (2, 32, -(-padded[0] // stride), -(-padded[1] // stride))
        outputs = detector(images)
    for (_, H, W), out in zip(ODD_IMAGES, outputs):
        boxes = out["boxes"]
        assert boxes.shape[1] == 4 and len(boxes) == len(out["scores"]) == len(out["labels"]) <= 100
        assert (boxes[:, 0::2] <= W).all() and (boxes[:, 1::2] <= H).all() and (boxes >= 0).all()


def test_mask_rcnn_trains_with_masks():
    torch.manual_seed(0)
    data = PastedObjectsDataset("train", num_images=2, image_size=(100, 140), object_size=(24, 48))
    detector = build_detector("stvit_r_swin_tiny_patch4_window7_224", data.num_classes, kind="mask_rcnn",
                              model_kwargs=TINY, rpn_post_nms_top_n_train=200, box_batch_size_per_image=32,
                              **SMALL_HEADS).train()
    images, targets = detection_collate([data[0], data[1]])
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    unit = detector.backbone.body.model.layers[2].units[0]
    assert unit.recovery.attn.q.weight.grad.abs().sum() > 0  # gradients reach the dumbbell unit
    with torch.no_grad():
        out = detector.eval()([images[0]])[0]
    assert out["masks"].shape[1:] == (1, *images[0].shape[-2:])


def test_detection_layout_detector_on_unpadded_images():
    """The released detector's layout as the backbone, each image at its own (odd) size: no padding at all."""
    torch.manual_seed(0)
    detector = build_detector("stvit_r_swin_tiny_patch4_window7_224", 3, model_kwargs=dict(layout="detection", **TINY),
                              size_divisible=1, **SMALL_HEADS).eval()
    body = detector.backbone.body
    assert body.model.layout == "detection" and body.model.feature_norms is not None
    image = torch.rand(*ODD_IMAGES[0])
    with torch.no_grad():
        batch, _ = detector.transform([image])
        assert batch.tensors.shape[-2:] == batch.image_sizes[0]  # not padded
        maps = body(batch.tensors)
        assert [tuple(m.shape[-2:]) for m in maps] == [tuple(-(-d // s) for d in batch.image_sizes[0])
                                                       for s in (4, 8, 16, 32)]
        assert len(detector([image])[0]["boxes"]) <= 100
    # STViT-R-DeiT takes any size too (the semantic tokens pooled from each image's grid)
    deit = build_detector("stvit_r_deit_tiny_patch16_224", 3, model_kwargs=dict(embed_dim=48, num_heads=3),
                          **SMALL_HEADS).eval()
    assert deit.transform.fixed_size is None
    with torch.no_grad():
        assert len(deit([image])) == 1


def test_detector_from_built_models_any_size_and_fixed_size():
    any_size = timm.create_model("stvit_r_swin_tiny_patch4_window7_224", dynamic_img_size=True, img_size=(160, 160),
                                 **TINY)
    detector = build_detector(any_size, 3, out_indices=(1, 2, 3), **SMALL_HEADS).eval()
    assert detector.backbone.strides == [8, 16, 32, 64] and detector.transform.fixed_size is None
    assert not hasattr(any_size, "head") or isinstance(any_size.head.fc, torch.nn.Identity)  # pruned by timm
    with torch.no_grad():
        detector([torch.rand(*ODD_IMAGES[0])])

    # STViT-R-DeiT takes one size: every image is resized to it (torchvision's fixed_size is width, height)
    detector = build_detector("stvit_r_deit_tiny_patch16_224", 3, model_kwargs=dict(img_size=(80, 112)),
                              **SMALL_HEADS).eval()
    assert detector.transform.fixed_size == (112, 80) and detector.backbone.strides == [16, 16, 32]
    with torch.no_grad():
        batch, _ = detector.transform([torch.rand(*s) for s in ODD_IMAGES])
        assert batch.tensors.shape[-2:] == (80, 112)
        outputs = detector([torch.rand(*s) for s in ODD_IMAGES])
    assert len(outputs) == 2


def test_build_detector_rejects_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="kind"):
        build_detector("stvit_r_swin_tiny_patch4_window7_224", 3, kind="retinanet")
    with pytest.raises(InvalidArgumentError, match="background"):
        build_detector("stvit_r_swin_tiny_patch4_window7_224", 1)
    with pytest.raises(InvalidArgumentError, match="anchor_sizes"):
        build_detector("stvit_r_swin_tiny_patch4_window7_224", 3, anchor_sizes=(32, 64), model_kwargs=TINY)
    with pytest.raises(InvalidArgumentError, match="model name"):
        build_detector(timm.create_model("swin_tiny_patch4_window7_224", **TINY), 3, model_kwargs=dict(embed_dim=8))
    with pytest.raises(InvalidArgumentError, match="feature API"):
        build_detector(torch.nn.Linear(3, 3), 3)


# --- evaluation -------------------------------------------------------------------------------------------


def test_coco_box_map_scores_perfect_and_misplaced_boxes():
    data = PastedObjectsDataset("val", num_images=4)
    targets = [data[i][1] for i in range(4)]
    sizes = [data[i][0].shape[-2:] for i in range(4)]

    def predictions(shift: float):
        out = []
        for t in targets:
            boxes = t["boxes"].clone()
            boxes[:, 0::2] += shift * (boxes[:, 2:3] - boxes[:, 0:1])  # move right by a fraction of the width
            out.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": t["labels"]})
        return out

    perfect = coco_box_map(targets, predictions(0.0), sizes, data.num_classes)
    assert perfect == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    shifted = coco_box_map(targets, predictions(0.2), sizes, data.num_classes)  # IoU 0.67: counts at 0.5, not 0.75
    assert shifted["map_50"] == 1.0 and shifted["map_75"] == 0.0
    wrong = coco_box_map(targets, predictions(0.7), sizes, data.num_classes)  # IoU 0.18
    assert wrong["map_50"] == 0.0
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}] * 4
    assert coco_box_map(targets, empty, sizes, data.num_classes)["map_50"] == 0.0


# --- training ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_detector_script_runs_and_saves(tmp_path):
    out = tmp_path / "detector.pt"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "train_detector.py"), "--model-arg", "embed_dim=16",
         "--model-arg", "num_heads=[1,2,4,8]", "--fpn-channels", "32", "--steps", "2", "--train-images", "4",
         "--val-images", "2", "--detector-arg", "rpn_post_nms_top_n_train=100", "--detector-arg",
         "rpn_post_nms_top_n_test=50", "--output", str(out), "--json"],
        capture_output=True, text=True, env=cli_env(), cwd=REPO_ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["steps"] == 2 and set(result["trained"]) == {"map", "map_50", "map_75"}
    state = torch.load(out, weights_only=True)
    assert any(k.startswith("backbone.body.model.layers.2.units.0.") for k in state)
    assert not list(tmp_path.glob("*.tmp"))

    bad = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "train_detector.py"), "--classes", "cat"],
                         capture_output=True, text=True, env=cli_env(), cwd=REPO_ROOT, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("Error: unknown Fashion-MNIST classes")


@pytest.mark.slow
def test_documented_example_trains_a_detector_far_above_untrained():
    # the example in docs/dense-tasks.md, run as written: ~300 CPU steps of a small STViT-R-Swin Faster R-CNN
    namespace: dict = {}
    exec(compile(doc_example("train-detector"), "docs/dense-tasks.md", "exec"), namespace)
    untrained, trained = namespace["untrained"], namespace["trained"]
    assert untrained["map_50"] < 0.02, untrained
    assert trained["map_50"] >= 0.15 and trained["map_50"] > 10 * untrained["map_50"], (untrained, trained)


def test_documented_feature_maps_example_runs():
    # the feature-map example in docs/dense-tasks.md, run as written (its asserts check the shapes)
    namespace: dict = {}
    exec(compile(doc_example("feature-maps"), "docs/dense-tasks.md", "exec"), namespace)
    assert len(namespace["feats"]) == 4 and len(namespace["maps"]) == 4
