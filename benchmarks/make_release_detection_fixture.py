"""Build the COCO-detector fixture: a reduced-width STViT-R-Swin-S Cascade Mask R-CNN checkpoint in the released
detector's format (mmdetection 2.x), and the feature maps the **official** detection backbone computes from it.

The official code is not part of this project: pass a checkout of github.com/changsn/STViT-R-Object-Detection.
Only its ``mmdet/models/backbones/swin_transformer.py`` and ``layers.py`` are loaded (their torch code runs as
written); their few mmdet/mmcv imports (the backbone registry, a checkpoint loader, a logger) are replaced by
stand-ins here, which the backbone's computation never calls. See tests/fixtures/README.md.

    python benchmarks/make_release_detection_fixture.py --official PATH/TO/STViT-R-Object-Detection
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PHOTOS = ROOT / "stvit_core" / "data" / "detection_backgrounds"
MEAN, STD = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])  # mmdet's COCO config

# tiny width, the released STViT-R-Swin-S layout (configs/swin/cascade_mask_rcnn_swin_small_..._3x_coco.py)
BACKBONE = dict(embed_dim=8, depths=[2, 2, 18, 2], num_heads=[2, 4, 8, 16], window_size=7, window_sample_size=3,
                k_window_size_1=14, k_window_size_2=21, restore_k_window_size=27, mlp_ratio=4.0, qkv_bias=True,
                drop_path_rate=0.2, ape=False, patch_norm=True, out_indices=(0, 1, 2, 3),
                multi_scale="multi_scale_semantic_token1", relative_pos=False, pad_mask=True)
# (photo, top, left, height, width): stage-3 maps 7x10 (only the right padded), 10x13 (both), 14x7 (neither)
CROPS = [[("coffee.jpg", 10, 20, 97, 150)],
         [("chelsea.jpg", 0, 0, 150, 205), ("rocket.jpg", 30, 5, 150, 205)],
         [("astronaut.jpg", 40, 150, 224, 112)]]


def load_official(repo: Path) -> types.ModuleType:
    """The official backbone module, its mmdet/mmcv imports replaced by stand-ins it never calls."""
    backbones = repo / "mmdet" / "models" / "backbones"
    registry = types.SimpleNamespace(register_module=lambda *a, **k: (lambda cls: cls))
    stubs = {
        "mmdet": types.ModuleType("mmdet"), "mmdet.models": types.ModuleType("mmdet.models"),
        "mmdet.models.backbones": types.ModuleType("mmdet.models.backbones"),
        "mmdet.models.builder": types.ModuleType("mmdet.models.builder"),
        "mmdet.utils": types.ModuleType("mmdet.utils"), "mmcv_custom": types.ModuleType("mmcv_custom"),
    }
    stubs["mmdet.models.backbones"].__path__ = [str(backbones)]
    stubs["mmdet.models.builder"].BACKBONES = registry
    stubs["mmdet.utils"].get_root_logger = lambda *a, **k: None
    stubs["mmcv_custom"].load_checkpoint = lambda *a, **k: None
    sys.modules.update(stubs)
    module = None
    for name in ("layers", "swin_transformer"):
        spec = importlib.util.spec_from_file_location(f"mmdet.models.backbones.{name}", backbones / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def fill_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter and BatchNorm statistic drawn as for the release fixture (tests/fixtures/README.md)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif "layer_scale" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:  # LayerNorm / BatchNorm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))


def detector_heads(generator: torch.Generator) -> "OrderedDict[str, torch.Tensor]":
    """The rest of a Cascade Mask R-CNN state dict (FPN neck, RPN head, three 4conv1fc box heads with SyncBN,
    three FCN mask heads), named as mmdetection 2.x's modules name them, at a tiny width: the converter must
    ignore all of it."""
    c, sd = 4, OrderedDict()

    def add(name: str, *shape: int) -> None:
        sd[name] = torch.randn(shape, generator=generator)

    for i, width in enumerate((8, 16, 32, 64)):
        add(f"neck.lateral_convs.{i}.conv.weight", c, width, 1, 1), add(f"neck.lateral_convs.{i}.conv.bias", c)
        add(f"neck.fpn_convs.{i}.conv.weight", c, c, 3, 3), add(f"neck.fpn_convs.{i}.conv.bias", c)
    add("rpn_head.rpn_conv.weight", c, c, 3, 3), add("rpn_head.rpn_conv.bias", c)
    add("rpn_head.rpn_cls.weight", 3, c, 1, 1), add("rpn_head.rpn_cls.bias", 3)
    add("rpn_head.rpn_reg.weight", 12, c, 1, 1), add("rpn_head.rpn_reg.bias", 12)
    for stage in range(3):
        box = f"roi_head.bbox_head.{stage}."
        for j in range(4):
            add(box + f"shared_convs.{j}.conv.weight", c, c, 3, 3)
            for k in ("weight", "bias", "running_mean", "running_var"):
                add(box + f"shared_convs.{j}.bn.{k}", c)
            sd[box + f"shared_convs.{j}.bn.num_batches_tracked"] = torch.tensor(0)
        add(box + "shared_fcs.0.weight", 8, c * 49), add(box + "shared_fcs.0.bias", 8)
        add(box + "fc_cls.weight", 81, 8), add(box + "fc_cls.bias", 81)
        add(box + "fc_reg.weight", 320, 8), add(box + "fc_reg.bias", 320)
        mask = f"roi_head.mask_head.{stage}."
        for j in range(4):
            add(mask + f"convs.{j}.conv.weight", c, c, 3, 3), add(mask + f"convs.{j}.conv.bias", c)
        add(mask + "upsample.weight", c, c, 2, 2), add(mask + "upsample.bias", c)
        add(mask + "conv_logits.weight", 80, c, 1, 1), add(mask + "conv_logits.bias", 80)
    return sd


def crop(photo: str, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """An RGB uint8 crop ``(3, height, width)`` of a photo the package ships (so inputs need not be stored as floats)."""
    image = np.asarray(Image.open(PHOTOS / photo).convert("RGB"))[top:top + height, left:left + width]
    assert image.shape[:2] == (height, width), (photo, image.shape)
    return torch.from_numpy(image.copy()).permute(2, 0, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> the detector's input (mmdet's COCO mean/std over 0-255 pixels)."""
    return (images.float() - MEAN[:, None, None]) / STD[:, None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of STViT-R-Object-Detection")
    parser.add_argument("--output-dir", type=Path, default=FIXTURES)
    args = parser.parse_args()

    official = load_official(args.official)
    torch.manual_seed(0)
    backbone = official.SwinTransformer(**BACKBONE).eval()
    generator = torch.Generator().manual_seed(1)
    fill_weights(backbone, generator)

    state_dict = OrderedDict(("backbone." + k, v) for k, v in backbone.state_dict().items())
    state_dict.update(detector_heads(generator))
    checkpoint = {
        # what mmcv 1.3's save_checkpoint writes (plain strings and numbers), the optimizer left out as mmdet's
        # publish_model does
        "meta": {"mmdet_version": "2.11.0", "mmcv_version": "1.3.0", "time": "Tue May  3 17:59:14 2022",
                 "CLASSES": tuple(f"class{i}" for i in range(80)), "epoch": 36, "iter": 0,
                 "config": "model = dict(type='CascadeRCNN', backbone=dict(type='SwinTransformer', embed_dim=8))"},
        "state_dict": state_dict,
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "stvit_r_swin_coco_tiny.pth.gz").write_bytes(gzip.compress(buffer.getvalue(), 9, mtime=0))

    cases = []
    with torch.no_grad():
        for crops in CROPS:
            images = torch.stack([crop(*c) for c in crops])
            cases.append({"images": images, "features": list(backbone(normalise(images)))})
    torch.save({"cases": cases, "mean": MEAN, "std": STD, "backbone": BACKBONE},
               args.output_dir / "stvit_r_swin_coco_tiny_expected.pt")
    params = sum(p.numel() for p in backbone.parameters())
    print(f"{params:,} backbone parameters; {len(state_dict)} keys; features for "
          f"{[tuple(c['images'].shape) for c in cases]}")


if __name__ == "__main__":
    main()
