"""The main job end to end on the embedded Fashion-MNIST subset: convert -> fine-tune -> evaluate -> benchmark.

Runs offline in a few minutes on 2 CPU cores (``make demo`` / ``stvit demo``). The source is a DeiT-Tiny
layout (depth 12, class token) at a width and image size a CPU trains in minutes (width 64, 32 px images,
patch 4: 64 image tokens), randomly initialised since no pretrained weights are reachable offline. It is
converted to STViT with 16 semantic tokens, fine-tuned on the 2000 training images, evaluated on the 500
validation images, and timed against its source architecture. The figures it prints are kept in
``OUTPUT/summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import timm
import torch
import torch.nn as nn

from .benchmark import BenchmarkSettings, benchmark_pair
from .checkpoint import save_model
from .convert import conversion_metadata, convert_model
from .data import embedded_dataset_path
from .errors import InvalidArgumentError, OutputExistsError, StvitError, TrainingInterrupted
from .evaluate import evaluate_model
from .files import atomic_write_bytes
from .train import resolve_config, train

DEMO_SOURCE_NAME = "deit_tiny_patch16_224"
DEMO_SOURCE = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=2, num_classes=10)
SUMMARY_NAME = "summary.json"


def _prepare_output(output: Path, force: bool) -> Optional[Path]:
    """Create ``output``; returns the first folder this created (None if ``output`` existed), to be removed when
    the demo fails: a failed demo leaves nothing behind (except an interrupted one, whose message says how to
    start over)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise OutputExistsError(f"{output} already exists (use --force to overwrite)")
    missing = [p for p in (output, *output.parents) if not os.path.lexists(p)]
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a mkdir: always a write (describe_os_error would call a missing name a read)
        raise StvitError(f"cannot write {output}: {e.strerror or e}") from None
    return missing[-1] if missing else None


def _convert(num_semantic_tokens: Optional[int], seed: int):
    """The demo's source (random DeiT-Tiny layout) and its STViT conversion, with config.json metadata."""

    torch.manual_seed(seed)
    source = timm.create_model(DEMO_SOURCE_NAME, pretrained=False, **DEMO_SOURCE).eval()
    stvit = convert_model(source, num_semantic_tokens=num_semantic_tokens)
    metadata = conversion_metadata(source, stvit, source_name=DEMO_SOURCE_NAME)
    metadata.update(source_weights="random", source_args=dict(DEMO_SOURCE))
    return source, stvit, metadata


def _benchmark(source: nn.Module, stvit: nn.Module, num_semantic_tokens: int, log: Callable[[str], None]):
    """This model against its source, then the real DeiT-S at 224 px against its STViT version (CPU)."""

    bench = benchmark_pair(source, stvit.eval(), BenchmarkSettings(batch_size=32, device="cpu", rounds=3,
                                                                    min_round_time=0.5))
    log(f"[4/4] CPU inference, batch 32, this model: DeiT {bench['base']['img_per_sec']:.0f} img/s, "
        f"STViT {bench['stvit']['img_per_sec']:.0f} img/s -> {bench['speedup']:.2f}x "
        f"(FLOPs ratio {bench['flops_ratio']:.2f}x)")
    deit_s = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    bench_s = benchmark_pair(deit_s, convert_model(deit_s, num_semantic_tokens=num_semantic_tokens).eval(),
                             BenchmarkSettings(batch_size=16, device="cpu", rounds=3, min_round_time=1.0))
    log(f"      DeiT-S at 224 px, batch 16: {bench_s['base']['img_per_sec']:.1f} -> "
        f"{bench_s['stvit']['img_per_sec']:.1f} img/s -> {bench_s['speedup']:.2f}x "
        f"(FLOPs ratio {bench_s['flops_ratio']:.2f}x)")
    return bench, bench_s


def run_demo(
    output: Path,
    *,
    epochs: int = 10,
    num_semantic_tokens: Optional[int] = None,
    force: bool = False,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Run the demo into ``output``; returns (and writes to ``output/summary.json``) accuracy, GFLOPs, speedups.

    ``num_semantic_tokens`` defaults to 16 (the paper's headline setting); the source has 64 image tokens.
    """

    log = log or (lambda message: None)
    if epochs < 1:
        raise InvalidArgumentError(f"{{epochs}} must be at least 1, got {epochs}", epochs=epochs)
    output = Path(output)
    source, stvit, metadata = _convert(num_semantic_tokens, seed)  # bad arguments fail before anything is written
    num_semantic_tokens = stvit.num_semantic_tokens
    created = _prepare_output(output, force)
    try:
        data = embedded_dataset_path()
        save_model(stvit, output / "converted", force=True, metadata=metadata)
        log(f"[1/4] converted DeiT-Tiny layout -> STViT ({num_semantic_tokens} tokens): "
            f"{metadata['base_gflops']:.3f} -> {metadata['gflops']:.3f} GFLOPs, saved {output / 'converted'}")

        cfg = resolve_config(overrides=dict(
            data=str(data), output=str(output / "finetune"), epochs=epochs, batch_size=64, lr=1e-3, warmup_epochs=1,
            min_lr=1e-5, drop_path=0.0, scale_min=0.35, workers=0, seed=seed, quiet=True,
        ))
        log(f"[2/4] fine-tuning {epochs} epochs on {data.name} (2000 images, 10 classes)...")
        stvit.stvit_metadata = metadata  # carried into best/config.json, so the card shows source and GFLOPs
        try:
            trained = train(cfg, stvit, force=True, on_epoch_end=lambda row: log(
                f"      epoch {row['epoch']}: loss {row['train_loss']:.3f}, val top-1 {row['top1']:.1f}%"))
        except TrainingInterrupted:  # train() points at --resume, which the demo does not have
            raise TrainingInterrupted(f"interrupted while fine-tuning; the demo starts over when run again (with --force "
                                      f"to replace {output})") from None
        best = Path(trained["output"]) / "best"

        result = evaluate_model(str(best), str(data), imagenet=False, batch_size=100, workers=0)
        log(f"[3/4] eval on {result['images']} validation images: top-1 {result['top1']:.1f}%, top-5 "
            + ("n/a" if result["top5"] is None else f"{result['top5']:.1f}%"))
        bench, bench_s = _benchmark(source, stvit, num_semantic_tokens, log)
        summary = {
            "output": str(output), "model": str(best), "tokens": num_semantic_tokens, "epochs": epochs,
            "top1": result["top1"], "top5": result["top5"], "images": result["images"],
            "gflops": metadata["gflops"], "base_gflops": metadata["base_gflops"],
            "speedup": bench["speedup"], "flops_ratio": bench["flops_ratio"],
            "base_img_per_sec": bench["base"]["img_per_sec"], "stvit_img_per_sec": bench["stvit"]["img_per_sec"],
            "deit_small_speedup": bench_s["speedup"], "deit_small_flops_ratio": bench_s["flops_ratio"],
        }
        atomic_write_bytes(output / SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode())
    except Exception as e:  # a full disk, a failed step: nothing half-made stays (an interrupt keeps its run)
        if created is not None and not isinstance(e, TrainingInterrupted):
            shutil.rmtree(created, ignore_errors=True)
        raise
    return summary


__all__ = ["run_demo", "DEMO_SOURCE", "DEMO_SOURCE_NAME", "SUMMARY_NAME"]
