#!/usr/bin/env python
"""Where does STViT's time go? Times each part of STViT-DeiT and of the base DeiT on the same batch.

    python benchmarks/profile_parts.py --model deit_small --tokens 16 --batch-size 32
    python benchmarks/profile_parts.py --model deit_small --tokens 16 --batch-size 1 --reps 40

Parts: patch + position embedding, the image-token blocks, the semantic token generator, the semantic
blocks, norm + head; for the base model, the same first blocks and the blocks that STViT replaces. Every part
and both whole models run once per round, in turn, and each reports its median over the rounds: a host that
slows down for a while slows every part alike instead of whichever part was being timed then.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch

from stvit_core.benchmark import models_for_benchmark


@torch.inference_mode()
def alternating_medians(calls: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    """Median seconds per call, the calls taking turns within every round (one warm-up call each first)."""
    for fn in calls.values():
        fn()
    samples: Dict[str, list] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deit_small")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="rounds; every part runs once per round")
    args = p.parse_args()
    base, stvit, _ = models_for_benchmark(args.model, args.tokens)
    base.eval(), stvit.eval()
    x = torch.randn(args.batch_size, 3, *stvit.patch_embed.img_size)
    nb, ns = stvit.num_image_blocks, len(stvit.semantic_blocks)
    p = stvit.num_prefix_tokens
    with torch.inference_mode():
        embedded = stvit._pos_embed(stvit.patch_embed(x))
        feats = stvit.blocks(embedded)
        semantic = stvit.semantic_token_generator(feats[:, p:], stvit.patch_embed.grid_size, feats[:, :p] if p else None)
        out = stvit.semantic_blocks(semantic)
    parts = {
        "embed": lambda: stvit._pos_embed(stvit.patch_embed(x)),
        f"image blocks (x{nb})": lambda: stvit.blocks(embedded),
        "generator": lambda: stvit.semantic_token_generator(
            feats[:, p:], stvit.patch_embed.grid_size, feats[:, :p] if p else None),
        f"semantic blocks (x{ns})": lambda: stvit.semantic_blocks(semantic),
        "norm + head": lambda: stvit.forward_head(stvit.norm(out)),
    }
    base_parts = {
        f"first {nb} blocks": lambda: base.blocks[:nb](embedded),
        f"last {len(base.blocks) - nb} blocks": lambda: base.blocks[nb:](feats),
    }
    times = alternating_medians({**{f"stvit {k}": v for k, v in parts.items()},
                                 **{f"base {k}": v for k, v in base_parts.items()},
                                 "stvit total": lambda: stvit(x), "base total": lambda: base(x)}, args.reps)
    total_stvit, total_base = times["stvit total"], times["base total"]
    print(f"batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.reps} alternating rounds (medians)")
    for name in parts:
        t = times[f"stvit {name}"]
        print(f"  stvit {name:<24} {t * 1e3:8.1f} ms  {t / total_stvit * 100:5.1f}%")
    print(f"  stvit sum of the parts         {sum(times[f'stvit {n}'] for n in parts) * 1e3:8.1f} ms")
    print(f"  stvit total                    {total_stvit * 1e3:8.1f} ms")
    for name in base_parts:
        print(f"  base  {name:<24} {times[f'base {name}'] * 1e3:8.1f} ms")
    print(f"  base  total                    {total_base * 1e3:8.1f} ms")
    print(f"  speedup {total_base / total_stvit:.2f}x")


if __name__ == "__main__":
    main()
