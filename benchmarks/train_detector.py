"""Train and evaluate a torchvision detector over an STViT-R (or any timm) backbone on the pasted-objects set.

    python benchmarks/train_detector.py --model stvit_r_swin_tiny_patch4_window7_224 \\
        --model-arg embed_dim=32 --model-arg num_heads=[1,2,4,8] --steps 300 --batch-size 2

Builds the detector with stvit_core.detection.build_detector, evaluates the untrained detector, trains it with
train_detector (SGD with momentum by default, warm-up then cosine) on PastedObjectsDataset('train'), evaluates it again on
PastedObjectsDataset('val') (unseen items, other crops) and prints both COCO box mAPs (pycocotools). With
``--output FILE`` the trained detector's state dict is saved (written to a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from stvit_core.detection import build_detector, evaluate_detector, train_detector
from stvit_core.detection_data import PastedObjectsDataset
from stvit_core.errors import StvitError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="stvit_r_swin_tiny_patch4_window7_224", help="timm model name or local-dir:DIR")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="timm.create_model argument (YAML value), e.g. embed_dim=32 or num_heads=[1,2,4,8]")
    p.add_argument("--detector-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="torchvision FasterRCNN/MaskRCNN argument (YAML value), e.g. rpn_post_nms_top_n_train=150")
    p.add_argument("--kind", default="faster_rcnn", choices=("faster_rcnn", "mask_rcnn"))
    p.add_argument("--out-indices", type=int, nargs="+")
    p.add_argument("--anchor-sizes", type=int, nargs="+")
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--representation-size", type=int, default=256)
    p.add_argument("--min-size", type=int, default=128)
    p.add_argument("--max-size", type=int, default=192)
    p.add_argument("--classes", nargs="+", help="Fashion-MNIST class names (default: all ten)")
    p.add_argument("--train-images", type=int, default=2048)
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--image-size", type=int, nargs=2, default=(112, 160), metavar=("LOW", "HIGH"))
    p.add_argument("--object-size", type=int, nargs=2, default=(32, 64), metavar=("LOW", "HIGH"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--optimizer", default="sgd", help="sgd (momentum 0.9, torchvision's) or adamw")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="save the trained detector's state dict here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def parse_pairs(option: str, pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise StvitError(f"{option} needs KEY=VALUE, got {pair!r}")
        value = yaml.safe_load(value)
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def run(args: argparse.Namespace) -> dict:
    data = dict(classes=args.classes, image_size=tuple(args.image_size), object_size=tuple(args.object_size))
    train_set = PastedObjectsDataset("train", num_images=args.train_images, seed=args.seed, **data)
    val_set = PastedObjectsDataset("val", num_images=args.val_images, seed=args.seed + 1, **data)
    torch.manual_seed(args.seed)
    detector = build_detector(
        args.model, train_set.num_classes, kind=args.kind, out_indices=args.out_indices,
        anchor_sizes=args.anchor_sizes, fpn_channels=args.fpn_channels,
        representation_size=args.representation_size, min_size=args.min_size, max_size=args.max_size,
        model_kwargs=parse_pairs("--model-arg", args.model_arg), **parse_pairs("--detector-arg", args.detector_arg),
    )
    untrained = evaluate_detector(detector, val_set)
    t0 = time.perf_counter()
    history = train_detector(detector, train_set, steps=args.steps, batch_size=args.batch_size,
                             optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                             warmup_steps=args.warmup_steps, grad_clip=args.grad_clip, seed=args.seed)
    train_seconds = time.perf_counter() - t0
    trained = evaluate_detector(detector, val_set)
    if args.output is not None:
        tmp = args.output.with_name(args.output.name + ".tmp")
        torch.save(detector.state_dict(), tmp)
        os.replace(tmp, args.output)
    return {"untrained": untrained, "trained": trained, "train_seconds": round(train_seconds, 1),
            "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "steps": len(history)}


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        result = run(args)
    except StvitError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_code", 1)) from None
    if args.json:
        print(json.dumps(result))
        return
    print(f"box mAP@0.5: untrained {result['untrained']['map_50']:.4f}, trained {result['trained']['map_50']:.4f} "
          f"(mAP@[.5:.95] {result['untrained']['map']:.4f} -> {result['trained']['map']:.4f}); "
          f"{result['steps']} steps in {result['train_seconds']} s, loss {result['first_loss']:.3f} -> "
          f"{result['last_loss']:.3f}")


if __name__ == "__main__":
    main()
