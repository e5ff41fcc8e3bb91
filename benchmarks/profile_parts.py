#!/usr/bin/env python
"""Where does STViT's time go? Times each part of STViT-DeiT and of the base DeiT on the same batch.

    python benchmarks/profile_parts.py --model deit_small --tokens 16 --batch-size 32

Parts: patch + position embedding, the image-token blocks, the semantic token generator, the semantic
blocks, norm + head; for the base model, the same four blocks and the eight blocks that STViT replaces.
"""

from __future__ import annotations

import argparse

import torch
from swin_backbone_speed import median_time as timed  # a sibling script (benchmarks/ is sys.path[0])

from stvit_core.benchmark import models_for_benchmark


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="deit_small")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    base, stvit, _ = models_for_benchmark(args.model, args.tokens)
    base.eval(), stvit.eval()
    x = torch.randn(args.batch_size, 3, *stvit.patch_embed.img_size)
    nb = stvit.num_image_blocks
    with torch.inference_mode():
        embedded = stvit._pos_embed(stvit.patch_embed(x))
        feats = stvit.blocks(embedded)
        p = stvit.num_prefix_tokens
        semantic = stvit.semantic_token_generator(feats[:, p:], stvit.patch_embed.grid_size, feats[:, :p] if p else None)
        out = stvit.semantic_blocks(semantic)
    parts = {
        "embed": timed(lambda: stvit._pos_embed(stvit.patch_embed(x)), args.reps),
        f"image blocks (x{nb})": timed(lambda: stvit.blocks(embedded), args.reps),
        "generator": timed(lambda: stvit.semantic_token_generator(
            feats[:, p:], stvit.patch_embed.grid_size, feats[:, :p] if p else None), args.reps),
        f"semantic blocks (x{len(stvit.semantic_blocks)})": timed(lambda: stvit.semantic_blocks(semantic), args.reps),
        "norm + head": timed(lambda: stvit.forward_head(stvit.norm(out)), args.reps),
    }
    total_stvit = timed(lambda: stvit(x), args.reps)
    total_base = timed(lambda: base(x), args.reps)
    base_first = timed(lambda: base.blocks[:nb](embedded), args.reps)
    base_rest = timed(lambda: base.blocks[nb:](feats), args.reps)
    print(f"batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, t in parts.items():
        print(f"  stvit {name:<24} {t * 1e3:8.1f} ms  {t / total_stvit * 100:5.1f}%")
    print(f"  stvit total                    {total_stvit * 1e3:8.1f} ms")
    print(f"  base  first {nb} blocks            {base_first * 1e3:8.1f} ms")
    print(f"  base  last {len(base.blocks) - nb} blocks             {base_rest * 1e3:8.1f} ms")
    print(f"  base  total                    {total_base * 1e3:8.1f} ms")
    print(f"  speedup {total_base / total_stvit:.2f}x")


if __name__ == "__main__":
    main()
