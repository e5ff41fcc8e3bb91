#!/usr/bin/env python
"""Print the GFLOPs of DeiT-T/S/B and their STViT versions next to the paper's Table 1 (markdown).

    python benchmarks/flops_table.py

Models are built on the meta device (no memory, no weights); FLOPs are multiply-accumulates with the
attention matmuls counted (stvit_core.flops).
"""

from __future__ import annotations

import timm
import torch

import stvit_core  # noqa: F401
from stvit_core.flops import count_flops

TABLE_1 = {
    "tiny": (1.26, {16: 0.53, 36: 0.60, 64: 0.71, 100: 0.86}),
    "small": (4.58, {16: 1.91, 36: 2.20, 64: 2.62, 100: 3.16}),
    "base": (17.58, {16: 7.31, 36: 8.44, 64: 10.04, 100: 12.13}),
}


def gflops(name: str, **kwargs) -> float:
    with torch.device("meta"):
        return count_flops(timm.create_model(name, **kwargs))


def main() -> None:
    print("| model | base: paper / ours | 16 tokens | 36 | 64 | 100 |")
    print("|---|---|---|---|---|---|")
    for size, (paper_base, paper) in TABLE_1.items():
        cells = [f"{paper_base:.2f} / {gflops(f'deit_{size}_patch16_224'):.2f}"]
        for tokens, value in paper.items():
            ours = gflops(f"stvit_deit_{size}_patch16_224", num_semantic_tokens=tokens)
            cells.append(f"{value:.2f} / {ours:.2f} ({(ours - value) / value * 100:+.1f}%)")
        print(f"| DeiT-{size[0].upper()} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
