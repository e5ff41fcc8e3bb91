"""Why batch-1 latency gains less than throughput on a CPU: the matrix products of a block at 17 rows vs 197.

At batch 1 STViT-DeiT-S's semantic blocks multiply 17 token rows by the same weights an image block multiplies
197 rows by. This times ``nn.Linear`` at both row counts for the three weight shapes of a DeiT-S block
(qkv 384->1152, fc1 384->1536, fc2 1536->384), fp32, and prints the multiply-add rate and the rate at which the
weights are read, next to the machine's plain read bandwidth (a sum over 200 MB):

    python benchmarks/small_gemm.py --threads 2
    python benchmarks/small_gemm.py --threads 1

Best of ``--rounds`` rounds of ``--reps`` calls each.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

SHAPES = [(384, 1152), (384, 1536), (1536, 384)]  # DeiT-S: qkv, fc1, fc2 (in, out)


def best_time(fn: Callable[[], object], reps: int, rounds: int) -> float:
    for _ in range(min(reps, 10)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="17,197", help="token rows per product (default: 17,197)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--read-mb", type=int, default=200, help="size of the bandwidth probe (default: 200)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.reps < 1 or args.rounds < 1 or args.read_mb < 1:
        sys.exit("Error: --threads, --reps, --rounds and --read-mb must be at least 1")
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        sys.exit(f"Error: --rows: not a list of positive integers: {args.rows!r}")
    torch.set_num_threads(args.threads)
    probe = torch.randn(args.read_mb * 2**20 // 4)
    read_gbs = probe.numel() * 4 / best_time(probe.sum, 3, args.rounds) / 1e9
    print(f"torch {torch.__version__}, {args.threads} thread(s); plain read bandwidth {read_gbs:.1f} GB/s")
    results = []
    with torch.inference_mode():
        for m in rows:
            for k, n in SHAPES:
                linear, x = torch.nn.Linear(k, n), torch.randn(1, m, k)
                t = best_time(lambda: linear(x), args.reps, args.rounds)
                r = {"rows": m, "in": k, "out": n, "us": t * 1e6, "gmac_s": m * k * n / t / 1e9,
                     "weights_gb_s": k * n * 4 / t / 1e9}
                results.append(r)
                print(f"rows {m:4d}  {k:4d} -> {n:4d}: {r['us']:8.1f} us  {r['gmac_s']:6.1f} GMAC/s  "
                      f"weights read at {r['weights_gb_s']:5.1f} GB/s")
    return results


if __name__ == "__main__":
    main()
