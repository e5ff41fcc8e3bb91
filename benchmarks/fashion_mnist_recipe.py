"""Does converting pay? DeiT vs STViT-DeiT on the embedded Fashion-MNIST subset, from scratch and converted.

    python benchmarks/fashion_mnist_recipe.py --output bench-fm [--epochs 15] [--width 48] [--jobs 2]

Runs, all on the embedded subset (2000 train / 500 val images, 10 classes, upsampled 28 -> 32 px, patch 4,
so 64 image tokens), with the same recipe and budget for (a) and (b):
  (a) DeiT (depth 12) from scratch;
  (b) STViT-DeiT (4 image blocks + 2 generator layers + 6 semantic blocks, 16 semantic tokens) from scratch;
  (c) (a)'s trained DeiT converted to STViT (16 tokens; stvit_core.convert.convert_model) and fine-tuned for
      a fifth of the epochs, without and with soft distillation from the trained DeiT as teacher.
Reports the accuracy right after conversion, each run's curve, and the first epoch at which each STViT run
is within 1.5 points of (a)'s final top-1. Writes results.json, curves.csv and curves.png to --output.

The default width is 48 (DeiT-Tiny has 192) with 2 heads and 15 epochs, so the whole run fits about 25
minutes on 2 shared CPU cores; depth (12) and the STViT layout are DeiT-Tiny's. Pass --width 192 --heads 3
for the real width (about 15x the compute). --jobs 2 trains (a) beside (b), then the two fine-tunes side
by side, one thread each (300 epochs: about an hour on 2 cores). --scale-min sets RandomResizedCrop's
smallest area (0.35 by default; docs/benchmarks-training.md's long runs use 0.8). --data runs the same recipe
on another ImageFolder with train/ and val/ (10 classes).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import stvit_core  # noqa: E402,F401
from stvit_core import data as stdata  # noqa: E402
from stvit_core.convert import convert_model  # noqa: E402
from stvit_core.data import embedded_dataset_path  # noqa: E402
from stvit_core.distributed import DistInfo  # noqa: E402
from stvit_core.evaluate import eval_loader, validate  # noqa: E402
from stvit_core.train import resolve_config, train  # noqa: E402


def build(arch: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    kwargs: Dict[str, Any] = dict(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.width,
                                  depth=12, num_heads=args.heads, num_classes=10, drop_path_rate=args.drop_path)
    if arch.startswith("stvit"):
        kwargs["num_semantic_tokens"] = args.tokens
    return timm.create_model(arch, **kwargs)


def run(name: str, model: torch.nn.Module, args: argparse.Namespace, *, epochs: int, lr: float,
        warmup: float, teacher: Optional[torch.nn.Module] = None) -> List[Dict[str, Any]]:
    cfg = resolve_config(overrides=dict(
        data=str(args.data), output=str(args.output / name), epochs=epochs, batch_size=args.batch_size,
        lr=lr, warmup_epochs=warmup, min_lr=1e-5, weight_decay=0.05, clip_grad=5.0, smoothing=0.1,
        scale_min=args.scale_min, workers=args.workers, seed=args.seed, quiet=True,
        distill="soft" if teacher is not None else None, distill_alpha=0.5, distill_tau=1.0,
    ))
    rows: List[Dict[str, Any]] = []
    start = time.time()

    def log(row: Dict[str, Any]) -> None:
        rows.append(row)
        print(f"[{name}] epoch {row['epoch']:>2}  loss {row['train_loss']:.3f}  top1 {row['top1']:.1f}"
              f"  ({time.time() - start:.0f}s)", flush=True)

    train(cfg, model, teacher=teacher, force=True, on_epoch_end=log)
    return rows


def accuracy(model: torch.nn.Module, args: argparse.Namespace) -> float:
    dist = DistInfo()
    tf = stdata.build_transform(stdata.model_data_config(model), training=False)
    val = stdata.folder_dataset(args.data / "val", tf)
    return validate(model, eval_loader(val, 100, 0, dist), dist)["top1"]


def scratch_job(arch: str, args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], Dict[str, torch.Tensor]]:
    """(a) or (b): train ``arch`` from scratch; returns its curve and final weights."""
    torch.set_num_threads(max(1, args.threads // args.jobs))
    model = build(arch, args)
    rows = run(arch.split("_")[0] + "_scratch", model, args, epochs=args.epochs, lr=args.lr, warmup=2)
    return rows, model.state_dict()


def converted_job(deit_state: Dict[str, torch.Tensor], args: argparse.Namespace, ft_epochs: int,
                  distill: bool) -> Tuple[Optional[float], List[Dict[str, Any]]]:
    """(c): convert the trained DeiT and fine-tune it; returns the curve, and (without distillation; the
    conversion is the same) the accuracy right after conversion."""
    torch.set_num_threads(max(1, args.threads // args.jobs))
    deit = build("deit_tiny_patch16_224", args)
    deit.load_state_dict(deit_state)
    deit.eval()
    converted = convert_model(deit, num_semantic_tokens=args.tokens)
    after_conversion = None if distill else accuracy(converted, args)
    name = "stvit_converted_ft_distill" if distill else "stvit_converted_ft"
    rows = run(name, converted, args, epochs=ft_epochs, lr=args.ft_lr, warmup=0.5, teacher=deit if distill else None)
    return after_conversion, rows


def first_within(rows: List[Dict[str, Any]], target: float) -> Optional[int]:
    return next((r["epoch"] for r in rows if r["top1"] >= target), None)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench-fashion-mnist"))
    parser.add_argument("--data", type=Path, default=embedded_dataset_path(),
                        help="ImageFolder with train/ and val/ (default: the embedded Fashion-MNIST subset)")
    parser.add_argument("--epochs", type=int, default=15, help="from-scratch epochs for (a) and (b)")
    parser.add_argument("--ft-epochs", type=int, default=None, help="fine-tune epochs for (c) [epochs // 5]")
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ft-lr", type=float, default=2.5e-4)
    parser.add_argument("--drop-path", type=float, default=0.0)
    parser.add_argument("--scale-min", type=float, default=0.35, help="RandomResizedCrop's smallest area")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2),
                        help="processes: 2 runs (a) beside (b) and the two fine-tunes side by side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ft_epochs = args.ft_epochs or max(1, args.epochs // 5)
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # (a) and (b) are independent, and so are the two fine-tunes of (c): with --jobs 2 each pair runs in two
    # processes (threads split between them), which is what makes a long run fit the 2-core machine.
    # fork, not spawn: a spawned process would also spawn its data loader workers, re-importing torch every epoch.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        deit_job = pool.submit(scratch_job, "deit_tiny_patch16_224", args)
        stvit_job = pool.submit(scratch_job, "stvit_deit_tiny_patch16_224", args)
        curves = {"deit_scratch": deit_job.result()[0], "stvit_scratch": stvit_job.result()[0]}
        deit_state = deit_job.result()[1]
        plain = pool.submit(converted_job, deit_state, args, ft_epochs, False)
        distilled = pool.submit(converted_job, deit_state, args, ft_epochs, True)
        after_conversion, curves["stvit_converted_ft"] = plain.result()
        _, curves["stvit_converted_ft_distill"] = distilled.result()
    print(f"[converted] top1 right after conversion: {after_conversion:.1f}", flush=True)

    deit_final = curves["deit_scratch"][-1]["top1"]
    target = deit_final - 1.5
    summary: Dict[str, Any] = {
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {args.threads}",
        "torch": torch.__version__, "timm": timm.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ft_epochs": ft_epochs, "deit_final_top1": deit_final, "target_top1": target,
        "top1_right_after_conversion": after_conversion, "minutes": (time.time() - t0) / 60, "runs": {},
    }
    for name, rows in curves.items():
        summary["runs"][name] = {
            "final_top1": rows[-1]["top1"], "best_top1": max(r["top1"] for r in rows),
            "epochs_to_within_1.5": first_within(rows, target),
            "train_img_per_sec": sum(r["train_img_per_sec"] for r in rows) / len(rows),
            "top1_per_epoch": [r["top1"] for r in rows],
        }
    (args.output / "results.json").write_text(json.dumps(summary, indent=2))
    with (args.output / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "epoch", "train_loss", "val_loss", "top1", "top5"])
        for name, rows in curves.items():
            for r in rows:
                writer.writerow([name, r["epoch"], r["train_loss"], r["val_loss"], r["top1"], r["top5"]])
    plot(curves, after_conversion, target, args.output / "curves.png")

    print(f"\nDeiT final top-1 {deit_final:.1f}; target (within 1.5) {target:.1f}; "
          f"converted STViT before fine-tuning {after_conversion:.1f}; {summary['minutes']:.1f} min\n")
    print("| run | epochs | final top-1 | best top-1 | epochs to within 1.5 of DeiT | train img/s |")
    print("|---|---|---|---|---|---|")
    for name, r in summary["runs"].items():
        print(f"| {name} | {len(r['top1_per_epoch'])} | {r['final_top1']:.1f} | {r['best_top1']:.1f} | "
              f"{r['epochs_to_within_1.5'] or 'not reached'} | {r['train_img_per_sec']:.0f} |")


def plot(curves: Dict[str, List[Dict[str, Any]]], after_conversion: float, target: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        epochs = [r["epoch"] for r in rows]
        top1 = [r["top1"] for r in rows]
        if name.startswith("stvit_converted"):
            epochs, top1 = [0] + epochs, [after_conversion] + top1
        ax.plot(epochs, top1, marker="." if name.startswith("stvit_converted") else None, label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="DeiT final - 1.5")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Fashion-MNIST subset: DeiT vs STViT (16 tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
