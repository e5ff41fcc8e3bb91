#!/usr/bin/env python
"""Sweep models x semantic tokens x batch sizes with `stvit_core.benchmark`; write a CSV and a PNG.

Every row is one base-vs-STViT pair timed in the same process (alternating rounds), so the speedup column is
a ratio of two measurements taken under the same conditions.

    python benchmarks/sweep.py --models deit_tiny deit_small deit_base --tokens 16 36 64 100 \
        --batch-sizes 32 --device cpu --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

import torch

from stvit_core.benchmark import BenchmarkSettings, benchmark_pair, models_for_benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small", "deit_base"])
    p.add_argument("--tokens", nargs="+", type=int, default=[16, 36, 64, 100])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--bench", default="inference", choices=["inference", "train"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-time", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep"))
    args = p.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        for tokens in args.tokens:
            base, stvit, source = models_for_benchmark(name, tokens)
            for batch in args.batch_sizes:
                settings = BenchmarkSettings(batch_size=batch, device=args.device, dtype=args.dtype, bench=args.bench,
                                             compile=args.compile, rounds=args.rounds, min_round_time=args.round_time)
                r = benchmark_pair(base, stvit, settings)
                row = {
                    "model": source, "tokens": tokens, "batch_size": batch, "device": r["device"], "dtype": args.dtype,
                    "bench": args.bench, "compile": args.compile,
                    "base_gflops": r["base"]["gflops"], "stvit_gflops": r["stvit"]["gflops"],
                    "base_img_per_sec": r["base"]["img_per_sec"], "stvit_img_per_sec": r["stvit"]["img_per_sec"],
                    "speedup": r["speedup"], "flops_ratio": r["flops_ratio"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
            "processor": platform.processor()}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    _plot(rows, args.out.with_suffix(".png"))


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; skipping the plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        for batch in dict.fromkeys(r["batch_size"] for r in rows):
            sel = [r for r in rows if r["model"] == model and r["batch_size"] == batch]
            ax.plot([r["tokens"] for r in sel], [r["speedup"] for r in sel], marker="o", label=f"{model} b{batch}")
            ax.plot([r["tokens"] for r in sel], [r["flops_ratio"] for r in sel], linestyle=":", color="grey")
    ax.set_xlabel("semantic tokens")
    ax.set_ylabel("speedup over base (dotted: FLOPs ratio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
