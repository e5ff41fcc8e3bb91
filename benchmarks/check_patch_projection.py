"""PatchProjection's GEMM against the convolution it replaces, on a device: logits in fp32 and bf16 autocast.

    python benchmarks/check_patch_projection.py --device cuda              # what docs/benchmarks.md reports
    python benchmarks/check_patch_projection.py --device cpu --batch-size 2  # the GEMM forced onto the CPU

Random weights. Prints, per model, the largest logit difference between the two paths and whether every image
keeps its top-1 class; with ``--compile``, also ``torch.compile`` and ``torch.export`` of the GEMM path against
eager. Exit status 1 when an fp32 difference exceeds 1e-4 or changes a top-1 class (bf16 is reported only: with
random weights two classes can sit within bf16 rounding of each other).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without an install (the device machine)
    sys.path.insert(0, str(REPO_ROOT))

import timm  # noqa: E402
import torch  # noqa: E402

import stvit_core  # noqa: E402,F401  (registers the models)
from stvit_core.layers import PatchProjection  # noqa: E402

MODELS = [
    ("stvit_deit_small_patch16_224", {}, 224),
    ("stvit_r_deit_small_patch16_224", {}, 224),
    ("stvit_r_swin_tiny_patch4_window7_224", {"stem": "patch"}, 224),
    ("stvit_deit_small_patch16_224", {"dynamic_img_size": True}, 232),
]


def use_gemm(model: torch.nn.Module, device: str, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, PatchProjection):
            module.gemm_devices = (device,) if on else ()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also torch.compile and torch.export (slow on a CPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("Error: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device_type = torch.device(args.device).type
    torch.manual_seed(0)
    ok = True
    for name, kwargs, size in MODELS:
        model = timm.create_model(name, **kwargs).to(args.device).eval()
        x = torch.randn(args.batch_size, 3, size, size, device=args.device)
        with torch.inference_mode():
            diffs, same_top1 = [], []
            for dtype in (None, torch.bfloat16):
                with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    use_gemm(model, device_type, False)
                    conv = model(x).float()
                    use_gemm(model, device_type, True)
                    gemm = model(x).float()
                diffs.append((gemm - conv).abs().max().item())
                same_top1.append(bool((gemm.argmax(-1) == conv.argmax(-1)).all()))
        ok &= diffs[0] <= 1e-4 and same_top1[0]
        print(f"{name} {kwargs or ''} {size}px: fp32 max |gemm - conv| {diffs[0]:.2e} (largest logit "
              f"{conv.abs().max().item():.2f}), same top-1: {same_top1[0]}; bf16 {diffs[1]:.2e}, same top-1: "
              f"{same_top1[1]}")
    if args.compile:
        model = timm.create_model("stvit_deit_small_patch16_224").to(args.device).eval()
        use_gemm(model, device_type, True)
        x = torch.randn(min(args.batch_size, 4), 3, 224, 224, device=args.device)
        with torch.inference_mode():
            eager = model(x)
            compiled = torch.compile(model)(x)
        exported = torch.export.export(model, (x,)).module()(x)
        print(f"torch.compile vs eager: {(compiled - eager).abs().max().item():.2e}; "
              f"torch.export vs eager: {(exported - eager).abs().max().item():.2e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
