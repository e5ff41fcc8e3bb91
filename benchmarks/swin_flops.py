"""GFLOPs of STViT-R-Swin (T/S/B x 4/9/16 tokens per window x patch/conv stem) and timm's Swin, as a
Markdown table (docs/benchmarks-swin.md). Models are built on the meta device: runs in seconds on a CPU.

    python benchmarks/swin_flops.py
"""

from __future__ import annotations

import timm
import torch

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.flops import count_flops

SIZES = {"tiny": (96, 1), "small": (96, 3), "base": (128, 3)}  # embed_dim, dumbbell units


def main() -> None:
    print("| model | Swin (timm) | stem | 4 / window | 9 / window | 16 / window | 9, release-equivalent |")
    print("|---|---|---|---|---|---|---|")
    for size, (embed_dim, units) in SIZES.items():
        with torch.device("meta"):
            base = count_flops(timm.create_model(f"swin_{size}_patch4_window7_224"))
            for stem in ("patch", "conv"):
                g = {
                    t: count_flops(timm.create_model(
                        f"stvit_r_swin_{size}_patch4_window7_224", semantic_tokens_per_window=t, stem=stem))
                    for t in (4, 9, 16)
                }
                # the release projects keys/values once per gathered neighbourhood token (4 windows x 100),
                # we project the 196 image tokens once and gather: same result, fewer MACs
                dim = embed_dim * 4
                release = g[9] + units * (4 * 100 - 196) * 2 * dim * dim / 1e9
                cells = " | ".join(f"{g[t]:.2f} ({1 - g[t] / base:.0%} less)" for t in (4, 9, 16))
                print(f"| Swin-{size[0].upper()} | {base:.2f} | {stem} | {cells} | {release:.2f} |")


if __name__ == "__main__":
    main()
