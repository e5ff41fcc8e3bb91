#!/usr/bin/env python
"""Semantic segmentation with STViT-R-Swin against timm's Swin under the same UPerNet (segmentation-models-pytorch):
the paper's Table 14 GMACs, CPU throughput, and mIoU curves on the pasted-objects set.

    python benchmarks/segmentation.py flops                        # Table 14 at 512x512, about a minute
    OMP_NUM_THREADS=2 python benchmarks/segmentation.py speed --batch-size 1 4 --rounds 5
    OMP_NUM_THREADS=1 python benchmarks/segmentation.py speed --batch-size 1 4 --rounds 5 --cpu-time   # busy host
    OMP_NUM_THREADS=1 python benchmarks/segmentation.py train               # about 3 minutes of CPU time

``flops``: backbone GMACs (attention matmuls counted: stvit_core.flops.count_flops, the fvcore convention of the
paper) of timm's Swin-S/B and STViT-R-Swin-S/B in both layouts, and of the whole UPerNet (smp's defaults: decoder
width 256, 150 classes), every model built on the meta device.

``speed``: images per second of the backbone and of the whole UPerNet, STViT-R-Swin-S (released conv stem,
classification layout) against timm's Swin-S (window attention through SDPA, timm's ``fused_attn``), random
weights, fp32, inference mode, in one process with alternating rounds (stvit_core.benchmark.benchmark_models;
``--cpu-time``: process CPU time of each step through torch.utils.benchmark.Timer, one thread, for ratios on a
busy machine).

``train``: the same UPerNet recipe (stvit_core.segmentation.train_segmentation: AdamW, cross-entropy + Dice) on
STViT-R-Swin-T and timm's Swin-T at a reduced width (``--embed-dim``), same seed and data, validation mIoU every
``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch.utils.benchmark import Timer

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.benchmark import BenchmarkSettings, benchmark_models
from stvit_core.env import memory_allocator
from stvit_core.flops import count_flops
from stvit_core.segmentation import (
    PastedObjectsSegmentation,
    create_segmentation_model,
    evaluate_segmentation,
    train_segmentation,
)

PAPER = {"small": (49, 34), "base": (87, 60)}  # Table 14: backbone GFLOPs of Swin / STViT-R-Swin at 512x512
CLASSES = ["trouser", "bag", "sneaker", "dress", "sandal"]


def _encoders(size_name: str) -> Dict[str, Tuple[str, dict]]:
    ours = f"stvit_r_swin_{size_name}_patch4_window7_224"
    return {
        f"Swin-{size_name[0].upper()} (timm)": (f"swin_{size_name}_patch4_window7_224", {}),
        f"STViT-R-Swin-{size_name[0].upper()}, classification layout": (ours, {}),
        f"STViT-R-Swin-{size_name[0].upper()}, `layout=\"detection\"`": (ours, {"layout": "detection"}),
    }


def flops(size: Tuple[int, int], classes: int = 150) -> List[Dict[str, object]]:
    rows = []
    shape = (3, *size)
    print(f"| {size[0]}x{size[1]} | backbone GMACs | paper (GFLOPs) | UPerNet GMACs (smp, width 256, {classes} "
          "classes) |")
    print("|---|---|---|---|")
    for size_name, paper in PAPER.items():
        base = None
        for i, (label, (name, kwargs)) in enumerate(_encoders(size_name).items()):
            with torch.device("meta"):
                backbone = timm.create_model(name, features_only=True, feature_cls="getter", img_size=size,
                                             **kwargs)
                upernet = create_segmentation_model("UPerNet", name, classes, model_kwargs=dict(kwargs, img_size=size))
            b, u = count_flops(backbone, shape), count_flops(upernet.eval(), shape)
            base = base or (b, u)
            change = "" if i == 0 else f" ({b / base[0] - 1:+.0%})"
            change_u = "" if i == 0 else f" ({u / base[1] - 1:+.0%})"
            paper_cell = {0: paper[0], 2: paper[1]}.get(i, "")
            print(f"| {label} | {b:.1f}{change} | {paper_cell} | {u:.1f}{change_u} |", flush=True)
            rows.append({"model": label, "backbone_gmacs": b, "upernet_gmacs": u})
    return rows


def speed_models(size: Tuple[int, int]) -> Dict[str, torch.nn.Module]:
    models = {}
    for label, name in (("Swin-S", "swin_small_patch4_window7_224"), ("STViT-R-Swin-S", "stvit_r_swin_small_patch4_window7_224")):
        models[f"{label} backbone"] = timm.create_model(name, features_only=True, feature_cls="getter", img_size=size)
        models[f"{label} UPerNet"] = create_segmentation_model("UPerNet", name, 150, model_kwargs={"img_size": size})
    return {k: m.eval() for k, m in models.items()}


def cpu_time_rates(models: Dict[str, torch.nn.Module], shape: Tuple[int, ...], batch_size: int,
                   rounds: int) -> Dict[str, dict]:
    """Images per second of process CPU time, one step per model per round, models alternating."""
    x = torch.randn(batch_size, *shape)

    def timer(model: torch.nn.Module) -> Timer:
        def call() -> None:
            with torch.inference_mode():
                model(x)
        return Timer(stmt="call()", globals={"call": call}, timer=time.process_time)

    timers = {name: timer(m) for name, m in models.items()}
    for t in timers.values():
        t.timeit(1)  # warm-up
    samples: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, t in timers.items():
            samples[name].append(batch_size / t.timeit(1).mean)
    return {n: {"img_per_sec": statistics.median(v), "img_per_sec_rounds": v} for n, v in samples.items()}


def speed(size: Tuple[int, int], batch_sizes: Sequence[int], rounds: int, cpu_time: bool) -> None:
    models = speed_models(size)
    gmacs = {name: count_flops(m, (3, *size)) for name, m in models.items()}
    clock = "process CPU time" if cpu_time else "wall clock"
    print(f"| {size[0]}x{size[1]}, {torch.get_num_threads()} threads, {clock}, {memory_allocator()} malloc | batch "
          "| GMACs | img/s (median) | rounds | STViT-R / Swin | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch_size in batch_sizes:
        if cpu_time:
            results = cpu_time_rates(models, (3, *size), batch_size, rounds)
        else:
            settings = BenchmarkSettings(batch_size=batch_size, rounds=rounds, device="cpu", min_round_time=2.0)
            results = benchmark_models(models, (3, *size), settings)
        for name, r in results.items():
            part = name.split(" ")[-1]
            base = f"Swin-S {part}"
            ratio = r["img_per_sec"] / results[base]["img_per_sec"]
            rounds_text = " / ".join(f"{v:.3g}" for v in r["img_per_sec_rounds"])
            print(f"| {name} | {batch_size} | {gmacs[name]:.1f} | {r['img_per_sec']:.3g} | {rounds_text} | "
                  f"{ratio:.2f}x | {gmacs[base] / gmacs[name]:.2f}x |", flush=True)


def train(steps: int, eval_every: int, size: int, embed_dim: int, batch_size: int, lr: float, num_images: int,
          seed: int, output: Optional[str]) -> Dict[str, list]:
    data = dict(classes=CLASSES, object_size=(size // 4, size // 2))
    train_set = PastedObjectsSegmentation("train", num_images, size, seed=seed, **data)
    val_set = PastedObjectsSegmentation("val", 64, size, seed=seed + 1, **data)
    heads = tuple(max(1, embed_dim // 32) * 2 ** i for i in range(4))
    curves: Dict[str, list] = {}
    for label, name in (("Swin-T (timm)", "swin_tiny_patch4_window7_224"),
                        ("STViT-R-Swin-T", "stvit_r_swin_tiny_patch4_window7_224")):
        torch.manual_seed(seed)
        model = create_segmentation_model("UPerNet", name, train_set.num_classes, decoder_channels=64,
                                          model_kwargs=dict(embed_dim=embed_dim, num_heads=heads, drop_path_rate=0.1))
        curve = [(0, evaluate_segmentation(model, val_set)["miou"], 0.0)]
        start = time.process_time()

        def on_step(step: int, loss: float) -> None:
            if step % eval_every == 0:
                miou = evaluate_segmentation(model, val_set)["miou"]
                curve.append((step, miou, time.process_time() - start))
                print(f"{label}: step {step} loss {loss:.3f} val mIoU {miou:.3f} "
                      f"({time.process_time() - start:.0f} s CPU)", flush=True)

        train_segmentation(model, train_set, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=steps // 20,
                           seed=seed, on_step=on_step)
        curves[label] = curve
    print("\n| step | " + " | ".join(f"{k} val mIoU" for k in curves) + " |")
    print("|---|" + "---|" * len(curves))
    for i, (step, *_rest) in enumerate(next(iter(curves.values()))):
        print(f"| {step} | " + " | ".join(f"{c[i][1]:.3f}" for c in curves.values()) + " |")
    if output:
        with open(output, "w") as f:
            json.dump({"steps": steps, "size": size, "embed_dim": embed_dim, "curves": curves}, f, indent=1)
    return curves


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="job", required=True)
    q = sub.add_parser("flops", help="Table 14: backbone and UPerNet GMACs")
    q.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    q = sub.add_parser("speed", help="CPU throughput, backbone and UPerNet, STViT-R-Swin-S vs Swin-S")
    q.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    q.add_argument("--batch-size", type=int, nargs="+", default=[1, 4])
    q.add_argument("--rounds", type=int, default=5)
    q.add_argument("--cpu-time", action="store_true", help="process CPU time (needs OMP_NUM_THREADS=1)")
    q = sub.add_parser("train", help="mIoU curves of STViT-R-Swin-T and Swin-T under the same UPerNet")
    q.add_argument("--steps", type=int, default=300)
    q.add_argument("--eval-every", type=int, default=50)
    q.add_argument("--size", type=int, default=64, help="square image side (a multiple of 32)")
    q.add_argument("--embed-dim", type=int, default=32, help="width of stage 1 (96 is Swin-T's)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--num-images", type=int, default=2048)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--output", help="write the curves as JSON")
    args = p.parse_args(argv)
    if args.job == "flops":
        flops(tuple(args.size))
    elif args.job == "speed":
        if args.cpu_time and torch.get_num_threads() != 1:
            raise SystemExit("Error: --cpu-time needs one thread (OMP_NUM_THREADS=1)")
        speed(tuple(args.size), args.batch_size, args.rounds, args.cpu_time)
    else:
        train(args.steps, args.eval_every, args.size, args.embed_dim, args.batch_size, args.lr, args.num_images,
              args.seed, args.output)


if __name__ == "__main__":
    main()
