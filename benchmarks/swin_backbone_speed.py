"""CPU speed of STViT-R-Swin-S against timm's Swin-S as feature backbones, and where STViT-R's time goes.

    OMP_NUM_THREADS=2 python benchmarks/swin_backbone_speed.py throughput --size 224 224 --batch-size 8
    OMP_NUM_THREADS=2 python benchmarks/swin_backbone_speed.py throughput --size 800 1333 --batch-size 1
    OMP_NUM_THREADS=1 python benchmarks/swin_backbone_speed.py throughput --size 224 224 --batch-size 8 --cpu-time
    OMP_NUM_THREADS=1 python benchmarks/swin_backbone_speed.py parts --size 224 224 --batch-size 8
    LD_PRELOAD=libtcmalloc_minimal.so.4 OMP_NUM_THREADS=2 python benchmarks/swin_backbone_speed.py throughput \
        --size 800 1333 --batch-size 1

All models are ``features_only`` backbones (four NCHW maps), fp32, inference mode, random weights; timm's
Swin runs its window attention through ``scaled_dot_product_attention`` (``fused_attn``, what
``TIMM_FUSED_ATTN=2`` selects). ``throughput`` times the models in one process, alternating rounds
(stvit_core.benchmark; ``--cpu-time``: process CPU time per step, for ratios on a busy machine). ``parts``
times every part of stage 3 on its own captured input (summed over the units; timm's blocks grouped by the
unit position they correspond to) next to its share of the FLOPs, then each stage of both models.
Table headers name the malloc the process runs on (``LD_PRELOAD`` a tcmalloc to compare: it moves both
models' timings).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Callable, Dict, List, Tuple

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import WindowAttention
from torch.utils.benchmark import Timer

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.benchmark import BenchmarkSettings, benchmark_models
from stvit_core.env import memory_allocator
from stvit_core.flops import count_flops

UNIT_PARTS = ("Swin block", "generator layer 1", "generator layer 2", "semantic (window)", "semantic (all)",
              "recovery")


def backbones(size: Tuple[int, int]) -> Dict[str, torch.nn.Module]:
    kw = dict(features_only=True, feature_cls="getter", img_size=size, dynamic_img_size=size != (224, 224))
    models = {
        # timm's patch embedding pads to a multiple of 4 only when asked (as mmdetection's Swin and ours do)
        "timm Swin-S (SDPA)": timm.create_model("swin_small_patch4_window7_224", **kw,
                                                embed_layer=partial(PatchEmbed, dynamic_img_pad=True)),
        "STViT-R-Swin-S (conv stem)": timm.create_model("stvit_r_swin_small_patch4_window7_224", **kw),
        "STViT-R-Swin-S (patch stem)": timm.create_model("stvit_r_swin_small_patch4_window7_224", stem="patch", **kw),
        "STViT-R-Swin-S (detection layout)": timm.create_model("stvit_r_swin_small_patch4_window7_224",
                                                               layout="detection", **kw),
    }
    for model in models.values():
        model.eval()
        for m in model.modules():
            if isinstance(m, WindowAttention):
                m.fused_attn = True
    return models


def _timer(fn: Callable[[], object], **kwargs: object) -> Timer:
    """A Timer of ``fn`` under inference mode, with the threads this process runs with (Timer's default is one)."""
    def call() -> None:
        with torch.inference_mode():
            fn()

    return Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads(), **kwargs)


def cpu_time_rounds(models: Dict[str, torch.nn.Module], shape: Tuple[int, ...], batch_size: int, rounds: int,
                    warmup: int) -> Dict[str, dict]:
    """Images per second of *process CPU time*, one step per model per round, models alternating. With one
    thread this is the compute time itself, robust to other processes taking the cores (wall-clock timing on a
    shared machine is not); stvit_core.benchmark times wall clock, which is what to quote on a quiet machine."""
    x = torch.randn(batch_size, *shape)
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(x)
    # Timer runs two untimed calls before each timed one
    timers = {name: _timer(lambda m=model: m(x), timer=time.process_time) for name, model in models.items()}
    samples: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(batch_size / timer.timeit(1).mean)
    return {n: {"img_per_sec": statistics.median(v), "img_per_sec_rounds": v} for n, v in samples.items()}


def _rates(models: Dict[str, torch.nn.Module], size: Tuple[int, int], batch_size: int, rounds: int, warmup: int,
           cpu_time: bool) -> Dict[str, dict]:
    if cpu_time:
        if torch.get_num_threads() != 1:
            raise SystemExit("Error: --cpu-time needs one thread (OMP_NUM_THREADS=1)")
        return cpu_time_rounds(models, (3, *size), batch_size, rounds, warmup)
    settings = BenchmarkSettings(batch_size=batch_size, rounds=rounds, warmup=warmup, min_round_time=2.0)
    return benchmark_models(models, (3, *size), settings)


def _print_table(models: Dict[str, torch.nn.Module], results: Dict[str, dict], size: Tuple[int, int],
                 batch_size: int) -> None:
    base = "timm Swin-S (SDPA)"
    print(f"| backbone ({size[0]}x{size[1]}, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"{memory_allocator()} malloc) | GMACs | "
          "img/s (median) | rounds | speedup | FLOPs ratio |")
    print("|---|---|---|---|---|---|")
    base_flops = count_flops(models[base], (3, *size))
    for name, r in results.items():
        flops = count_flops(models[name], (3, *size))
        rounds_text = " / ".join(f"{v:.3g}" for v in r["img_per_sec_rounds"])
        print(f"| {name} | {flops:.2f} | {r['img_per_sec']:.3g} | {rounds_text} | "
              f"{r['img_per_sec'] / results[base]['img_per_sec']:.2f}x | {base_flops / flops:.2f}x |")


def throughput(size: Tuple[int, int], batch_size: int, rounds: int, warmup: int = 2, cpu_time: bool = False) -> None:
    models = backbones(size)
    _print_table(models, _rates(models, size, batch_size, rounds, warmup, cpu_time), size, batch_size)


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call of ``fn``: the mean over ``reps`` back-to-back calls, after Timer's own warm-up calls."""
    return _timer(fn).timeit(reps).mean


def _stage3_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The NHWC input of stage 3's first block (after its patch merging)."""
    inner = model.model
    with torch.inference_mode():
        h = inner.layers[1](inner.layers[0](inner.patch_embed(x)))
        return inner.layers[2].downsample(h)


def _count(fn: Callable[[], object]) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops() / 2e9


def part_calls(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, List[Callable[[], object]]]:
    """One zero-argument call per block of stage 3 (on its real input), grouped by unit position.

    The inputs are captured with forward pre-hooks during one forward of the stage, so every part is called
    exactly as the model calls it (whatever its arguments: pooled tokens, index buffers, masks).
    """
    stage = model.model.layers[2]
    calls: Dict[str, List[Callable[[], object]]] = {p: [] for p in UNIT_PARTS}
    if hasattr(stage, "units"):
        parts = [(unit_part, module) for unit in stage.units for unit_part, module in zip(UNIT_PARTS, (
            unit.image_blocks, unit.generator.layers[0], unit.generator.layers[1], unit.semantic_blocks[0],
            unit.semantic_blocks[1], unit.recovery))]
    else:
        parts = [(UNIT_PARTS[j % 6], block) for j, block in enumerate(stage.blocks)]

    def capture(module: torch.nn.Module, args: tuple, kwargs: dict, part: str) -> None:
        calls[part].append(lambda: module(*args, **kwargs))

    hooks = [module.register_forward_pre_hook(partial(capture, part=part), with_kwargs=True)
             for part, module in parts]
    try:
        with torch.inference_mode():  # the blocks after the stage's patch merging, as ops() runs them
            h = _stage3_input(model, x)
            stage.units(h) if hasattr(stage, "units") else stage.blocks(h)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def parts(size: Tuple[int, int], batch_size: int, reps: int) -> None:
    models = backbones(size)
    x = torch.randn(batch_size, 3, *size)
    print(f"| part of stage 3 ({size[0]}x{size[1]}, batch {batch_size}) | timm Swin-S ms | GMACs | "
          "STViT-R-Swin-S ms | GMACs | time ratio | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|")
    timed = {}
    for name in ("timm Swin-S (SDPA)", "STViT-R-Swin-S (patch stem)"):
        calls = part_calls(models[name], x)
        timed[name] = {p: (sum(median_time(c, reps) for c in cs) * 1e3, sum(_count(c) for c in cs))
                       for p, cs in calls.items()}
    base, ours = timed["timm Swin-S (SDPA)"], timed["STViT-R-Swin-S (patch stem)"]
    for p in UNIT_PARTS:
        (tb, fb), (to, fo) = base[p], ours[p]
        print(f"| {p} | {tb:.1f} | {fb:.3f} | {to:.1f} | {fo:.3f} | {tb / to:.2f}x | {fb / fo:.2f}x |")
    tb, fb = (sum(v[i] for v in base.values()) for i in (0, 1))
    to, fo = (sum(v[i] for v in ours.values()) for i in (0, 1))
    print(f"| **stage 3** | {tb:.1f} | {fb:.3f} | {to:.1f} | {fo:.3f} | {tb / to:.2f}x | {fb / fo:.2f}x |")
    for name, model in models.items():
        inner = model.model
        with torch.inference_mode():
            h0 = inner.patch_embed(x)
            h1 = inner.layers[0](h0)
            h2 = inner.layers[1](h1)
            h3 = inner.layers[2](h2)
        t = {
            "stem": median_time(lambda: inner.patch_embed(x), reps),
            "stage 1": median_time(lambda: inner.layers[0](h0), reps),
            "stage 2": median_time(lambda: inner.layers[1](h1), reps),
            "stage 3": median_time(lambda: inner.layers[2](h2), reps),
            "stage 4": median_time(lambda: inner.layers[3](h3), reps),
            "whole": median_time(lambda: model(x), reps),
        }
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in t.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("throughput", "parts"))
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="throughput: alternating rounds; parts: calls per part")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument("--cpu-time", action="store_true",
                   help="throughput: time process CPU time (one thread), for ratios on a busy machine")
    args = p.parse_args()
    size = tuple(args.size)
    torch.manual_seed(0)
    if args.what == "throughput":
        throughput(size, args.batch_size, args.rounds, args.warmup, args.cpu_time)
    else:
        parts(size, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
