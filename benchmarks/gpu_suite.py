"""The GPU suite: every STViT speed goal, measured in one run that fits 7 minutes on one GPU.

    python benchmarks/gpu_suite.py --device cuda --output-dir benchmarks/results
    python benchmarks/gpu_suite.py --device cpu --quick --output-dir /tmp/suite   # smoke test

Each model pair runs in its own process (compile caches, CUDA graphs and memory never interact; a pair that
fails records its one-line error and the suite goes on). The processes are forked from a
``multiprocessing`` forkserver that has imported torch, timm and stvit_core once and never touched CUDA, so a
pair pays no import time and starts with a fresh CUDA context. Within a pair both models are built, warmed
up (compiled where asked) one after the other, then timed in alternating rounds (stvit, base, base, stvit...)
with ``torch.utils.benchmark.Timer`` (device synchronised, the process's threads); each figure is the median over
rounds. Random weights, random input, bf16 autocast on CUDA.

Peak memory (CUDA only; ``null`` on the CPU, where torch has no allocator statistics) is what a model adds
while it is built, warmed up and run: ``torch.cuda.max_memory_allocated`` over that phase minus what was
allocated before it (the input batch and the other model excluded): weights, optimizer state, CUDA graph
pools, activations.

Exit status: 0 when every selected pair was measured or skipped, 1 when a pair failed (the rest is still
measured and written), 2 for a bad option (one ``Error:`` line, nothing written).

Output: ``OUTPUT_DIR/gpu_<device>_<date>.json`` (environment, command line, settings, every timing),
``OUTPUT_DIR/gpu_<device>_<date>.md`` (the table for docs/benchmarks.md) and, with ``--profile``,
``OUTPUT_DIR/gpu_<device>_<date>_profile.md`` (torch.profiler tables). All are rewritten atomically after
every pair, so a run cut short still leaves the pairs it finished.

Test hook (tests/test_gpu_suite.py): ``STVIT_GPU_SUITE_INJECT_FAILURE=PAIR[,PAIR:exit]`` makes a pair's process
raise, or with ``:exit`` die without a result (as a crash or an out-of-memory kill would).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from anywhere (the device machine has no install): this checkout's code
    sys.path.insert(0, str(REPO_ROOT))

INJECT_FAILURE_ENV = "STVIT_GPU_SUITE_INJECT_FAILURE"
# '__main__' first: the script puts this checkout on sys.path before stvit_core is imported
HEAVY_MODULES = ["__main__", "torch", "timm", "stvit_core"]


@dataclass(frozen=True)
class Pair:
    name: str
    kind: str  # 'inference' | 'train' | 'latency' | 'onnx' | 'finetune' | 'parity'
    stvit: str
    base: str
    target: Optional[float]  # the goal: speedup (base time / STViT time)
    target_text: str
    compile: bool
    estimate_s: float  # seconds at the default settings, process start and warm-up included (H200 run + margin)
    label: str
    compile_mode: Optional[str] = None  # inductor mode; None: 'reduce-overhead' for latency, else the default
    patch_gemm: bool = False  # both models' patch embedding as a gather + one GEMM (stvit_core.layers.use_patch_gemm)
    training: bool = False  # run with --training (or --only): whole training runs, minutes each


DEIT_S, STVIT_DEIT_S = "deit_small_patch16_224", "stvit_deit_small_patch16_224"
PAIRS: List[Pair] = [
    Pair("deit_s", "inference", STVIT_DEIT_S, DEIT_S, 2.2, ">= 2.2x", False, 25,
         "STViT-DeiT-S(16) vs DeiT-S, eager"),
    Pair("deit_s_same_embed", "inference", STVIT_DEIT_S, DEIT_S, None, "none (reported)", False, 20,
         "STViT-DeiT-S(16) vs DeiT-S with the same GEMM patch embedding, eager", patch_gemm=True),
    Pair("deit_s_compile", "inference", STVIT_DEIT_S, DEIT_S, 2.2, ">= 2.2x", True, 50,
         "STViT-DeiT-S(16) vs DeiT-S, torch.compile"),
    Pair("deit_s_graphs", "inference", STVIT_DEIT_S, DEIT_S, 2.2, ">= 2.2x", True, 50,
         "STViT-DeiT-S(16) vs DeiT-S, torch.compile reduce-overhead (CUDA graphs)", compile_mode="reduce-overhead"),
    Pair("deit_t", "inference", "stvit_deit_tiny_patch16_224", "deit_tiny_patch16_224", 2.0, ">= 2.0x", False, 15,
         "STViT-DeiT-T(16) vs DeiT-T, eager"),
    Pair("deit_t_graphs", "inference", "stvit_deit_tiny_patch16_224", "deit_tiny_patch16_224", 2.0, ">= 2.0x", True,
         40, "STViT-DeiT-T(16) vs DeiT-T, torch.compile reduce-overhead (CUDA graphs)", compile_mode="reduce-overhead"),
    Pair("deit_b", "inference", "stvit_deit_base_patch16_224", "deit_base_patch16_224", 2.2, ">= 2.2x", False, 15,
         "STViT-DeiT-B(16) vs DeiT-B, eager"),
    Pair("swin_s", "inference", "stvit_r_swin_small_patch4_window7_224", "swin_small_patch4_window7_224", 1.3,
         ">= 1.3x", False, 15, "STViT-R-Swin-S(9) vs Swin-S (fused attention), eager"),
    Pair("train_deit_s", "train", STVIT_DEIT_S, DEIT_S, 1.8, ">= 1.8x", False, 25,
         "training step (fwd + bwd + AdamW) STViT-DeiT-S(16) vs DeiT-S"),
    Pair("train_deit_s_compile", "train", STVIT_DEIT_S, DEIT_S, 1.8, ">= 1.8x", True, 90,
         "training step (fwd + bwd + AdamW) STViT-DeiT-S(16) vs DeiT-S, torch.compile"),
    Pair("train_deit_s_graphs", "train", STVIT_DEIT_S, DEIT_S, 1.8, ">= 1.8x", True, 90,
         "training step (fwd + bwd + AdamW) STViT-DeiT-S(16) vs DeiT-S, torch.compile reduce-overhead (CUDA graphs)",
         compile_mode="reduce-overhead"),
    Pair("latency_deit_s", "latency", STVIT_DEIT_S, DEIT_S, 1.0, "p50 ratio >= 1.0", True, 35,
         "batch-1 latency, torch.compile reduce-overhead (CUDA graphs)"),
    Pair("onnx_deit_s", "onnx", STVIT_DEIT_S, DEIT_S, None, "none (reported)", False, 60,
         "ONNX Runtime CUDA EP (fp32), STViT-DeiT-S(16) vs DeiT-S"),
    Pair("finetune_deit_s", "finetune", STVIT_DEIT_S, DEIT_S, 1.8, ">= 1.8x", False, 150,
         "stvit finetune epoch over JPEG files (loader) and from memory, STViT-DeiT-S(16) vs DeiT-S", training=True),
    Pair("parity_fmnist", "parity", "stvit_deit_tiny_patch16_224", "deit_tiny_patch16_224", None,
         "within 0.5 points", False, 330, "Fashion-MNIST top-1 from scratch, STViT-DeiT-Tiny(16) vs DeiT-Tiny layout",
         training=True),
]
PAIR_NAMES = [p.name for p in PAIRS]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist

# --quick: the same code paths on tiny widths and sizes, so the whole suite runs on a CPU in well under a minute
# (half depth: torch.compile's tracing time grows with the blocks; STViT keeps image / generator / semantic parts)
QUICK_DEIT_KWARGS = {"embed_dim": 48, "num_heads": 3, "depth": 6}
QUICK_STVIT_DEIT_KWARGS = {**QUICK_DEIT_KWARGS, "num_image_blocks": 2}
QUICK_SWIN_KWARGS = {"embed_dim": 24, "num_heads": (1, 2, 4, 8), "depths": (2, 2, 6, 2)}  # one dumbbell unit


@dataclass
class Settings:
    device: str
    dtype: str  # 'bf16' | 'fp16' | 'fp32' (autocast dtype; fp32 = no autocast)
    batch_size: int
    latency_batch_size: int
    deit_img_size: int
    swin_img_size: int
    rounds: int
    min_round_time: float
    warmup: int
    latency_samples: int  # timed calls per model per round
    compile_backend: str
    quick: bool
    profile: Optional[str]  # None | 'misses' | 'all'
    profile_steps: int
    finetune_images: int  # JPEG training images written for finetune_deit_s
    workers: int  # data loader workers of the training pairs
    parity_epochs: int
    parity_seeds: int
    fashion_mnist: Optional[str]  # IDX folder of the full set; None (--quick): the embedded subset


class SuiteError(Exception):
    """A bad option or an unusable output directory: one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + error; the project's contract is one line
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(description="STViT GPU suite: every speed goal, one process per model pair.")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to run (default: cuda)")
    p.add_argument("--quick", action="store_true",
                   help="tiny widths, sizes, batches and rounds: checks the suite end to end on a CPU")
    p.add_argument("--output-dir", default="benchmarks/results",
                   help="where the JSON / markdown go (default: benchmarks/results)")
    p.add_argument("--only", default=None, help=f"comma-separated pairs to run (default: all): {','.join(PAIR_NAMES)}")
    p.add_argument("--batch-size", type=int, default=None, help="throughput / training batch (default: 256; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="alternating timing rounds per pair (default: 5; quick 2)")
    p.add_argument("--min-round-time", type=float, default=None,
                   help="seconds of work per model per round (default: 0.5; quick 0.02)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on cuda, fp32 on cpu; bf16/fp16 need cuda)")
    p.add_argument("--skip-compile", action="store_true", help="skip the pairs that need torch.compile")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; quick: eager, which only traces)")
    p.add_argument("--profile", nargs="?", const="misses", choices=["misses", "all"], default=None,
                   help="torch.profiler tables for the pairs that miss their target ('all': every pair)")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds for the whole suite; pairs that would start past it are skipped (default: 420)")
    p.add_argument("--pair-timeout", type=float, default=240.0, help="seconds one pair may take (default: 240)")
    p.add_argument("--training", action="store_true",
                   help="also run the training pairs (finetune_deit_s, parity_fmnist): minutes each")
    p.add_argument("--finetune-images", type=int, default=None,
                   help="224 px JPEGs written for finetune_deit_s (default: 20000; quick 24)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers of the training pairs (default: 8)")
    p.add_argument("--parity-epochs", type=int, default=None, help="epochs of each parity_fmnist run (default: 10)")
    p.add_argument("--fashion-mnist", default=FASHION_MNIST,
                   help=f"folder of the Fashion-MNIST IDX .gz files (default: {FASHION_MNIST})")
    args = p.parse_args(argv)
    for name in ("batch_size", "rounds", "finetune_images", "parity_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("min_round_time", "time_budget", "pair_timeout"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.dtype in ("bf16", "fp16") and args.device != "cuda":
        p.error(f"--dtype {args.dtype} applies to --device cuda only (the CPU runs fp32)")
    if args.only is not None:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in PAIR_NAMES]
        if not wanted or unknown:
            p.error(f"--only: unknown pair {', '.join(map(repr, unknown)) or repr(args.only)} "
                    f"(pairs: {', '.join(PAIR_NAMES)})")
        args.only = wanted
    return args


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = args.quick

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    return Settings(
        device=args.device,
        dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"),
        batch_size=pick(args.batch_size, 256, 2),
        latency_batch_size=1,
        deit_img_size=112 if quick else 224,
        swin_img_size=224,  # stage 3 needs whole 7x7 windows
        rounds=pick(args.rounds, 5, 2),
        min_round_time=pick(args.min_round_time, 0.5, 0.02),
        warmup=1 if quick else 3,
        latency_samples=3 if quick else 50,
        compile_backend=pick(args.compile_backend, "inductor", "eager"),
        quick=quick,
        profile=args.profile,
        profile_steps=1 if quick else 5,
        finetune_images=pick(args.finetune_images, 20000, 24),
        workers=pick(args.workers, 8, 0),
        parity_epochs=pick(args.parity_epochs, 10, 1),
        parity_seeds=2 if quick else 3,
        fashion_mnist=None if quick else args.fashion_mnist,
    )


# ----------------------------------------------------------------------------------------------------------
# Worker side: runs in a process forked from the forkserver (torch, timm and stvit_core already imported)
# ----------------------------------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def environment_info(settings: Settings) -> Dict[str, Any]:
    import platform

    import timm
    import torch

    import stvit_core
    from stvit_core.device import resolve_device

    device = resolve_device(settings.device)  # one-line InvalidArgumentError when CUDA is missing
    info: Dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "timm": timm.__version__, "stvit": stvit_core.__version__, "cuda": torch.version.cuda,
        "device": str(device), "device_name": platform.processor() or platform.machine() or "cpu",
        "cpu_threads": torch.get_num_threads(), "cudnn": None, "gpu_memory_gib": None,
        "stvit_path": os.path.dirname(stvit_core.__file__), "timm_path": os.path.dirname(timm.__file__),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), multiprocessors=props.multi_processor_count,
                    compute_capability=list(torch.cuda.get_device_capability(device)))
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_kwargs(pair: Pair, name: str, settings: Settings) -> Dict[str, Any]:
    swin = "swin" in name
    kwargs: Dict[str, Any] = {"img_size": settings.swin_img_size if swin else settings.deit_img_size}
    if settings.quick:
        kwargs.update(QUICK_SWIN_KWARGS if swin else QUICK_STVIT_DEIT_KWARGS if name.startswith("stvit") else
                      QUICK_DEIT_KWARGS)
    if pair.patch_gemm:
        kwargs["patch_gemm"] = True  # _build_model applies the opt-in speed step after timm built the model
    if swin and name.startswith("swin_"):
        # timm's WindowAttention is 'experimental' fused (off unless TIMM_FUSED_ATTN=2): _build_model turns it on
        kwargs["fused_attn"] = True
    return kwargs


def _jsonable(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _build_model(name: str, kwargs: Dict[str, Any], device: Any) -> Any:
    import timm
    from timm.models.swin_transformer import WindowAttention

    from stvit_core.layers import use_patch_gemm

    kwargs = dict(kwargs)
    fused = kwargs.pop("fused_attn", False)
    patch_gemm = kwargs.pop("patch_gemm", False)
    with device:  # built on the device: no host-side init of large models
        model = timm.create_model(name, **kwargs)
    if fused:
        for module in model.modules():  # timm's constructor takes no such argument: set it on each attention
            if isinstance(module, WindowAttention):
                module.fused_attn = True
    if patch_gemm and use_patch_gemm(model) == 0:
        raise ValueError(f"{name}: its patch embedding is not a plain patchifying convolution")
    return model


def _compile_mode(pair: Pair, settings: Settings) -> Optional[str]:
    """The inductor mode of a compiled pair (``None``: inductor's default, or another backend, which has none)."""
    if not pair.compile or settings.compile_backend != "inductor":
        return None
    return pair.compile_mode or ("reduce-overhead" if pair.kind == "latency" else None)


def _make_step(pair: Pair, model: Any, x: Any, settings: Settings) -> Callable[[], Any]:
    import torch

    from stvit_core.benchmark import make_step

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[settings.dtype]
    return make_step(model, x, train=pair.kind == "train", dtype=dtype, compile=pair.compile,
                     compile_mode=_compile_mode(pair, settings), compile_backend=settings.compile_backend,
                     fused_optimizer=x.device.type == "cuda")


def _timed_steps(step: Callable[[], Any], count: int) -> float:
    """Seconds per step over ``count`` back-to-back steps: torch.utils.benchmark.Timer synchronises the device
    before and after, and runs a few untimed steps first."""
    import torch
    from torch.utils.benchmark import Timer

    # Timer would time on one thread by default; measure with the threads the process runs with
    return Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads()).timeit(count).mean


def _prepare(pair: Pair, settings: Settings, device: Any, batch_size: int) -> Dict[str, Dict[str, Any]]:
    """Build, warm up and size each model in turn; returns per role: step, peak memory, warm-up time."""
    import torch

    prepared: Dict[str, Dict[str, Any]] = {}
    for role, name in (("stvit", pair.stvit), ("base", pair.base)):
        kwargs = _model_kwargs(pair, name, settings)
        size = kwargs["img_size"]
        torch.manual_seed(0)
        x = torch.randn(batch_size, 3, size, size, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        model = _build_model(name, kwargs, device)
        step = _make_step(pair, model, x, settings)
        for _ in range(settings.warmup + (1 if pair.compile else 0)):
            step()
        _sync(device)
        warmup_s = time.perf_counter() - start
        peak_mb = None
        if device.type == "cuda":
            peak_mb = round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)
        prepared[role] = {"model": name, "model_kwargs": _jsonable(kwargs),
                          "step": step, "build_and_warmup_s": round(warmup_s, 3), "peak_memory_mb": peak_mb,
                          "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
    return prepared


def _alternating(roles: Sequence[str], rounds: int) -> List[List[str]]:
    return [list(roles) if r % 2 == 0 else list(reversed(roles)) for r in range(rounds)]


def _measure_throughput(pair: Pair, settings: Settings, device: Any) -> Dict[str, Any]:
    prepared = _prepare(pair, settings, device, settings.batch_size)
    steps = {}
    for role, p in prepared.items():  # steps per round from one timed step
        one = _timed_steps(p["step"], 1)
        steps[role] = max(1, math.ceil(settings.min_round_time / max(one, 1e-9)))
    per_round: Dict[str, List[float]] = {role: [] for role in prepared}
    for order in _alternating(list(prepared), settings.rounds):
        for role in order:
            per_round[role].append(_timed_steps(prepared[role]["step"], steps[role]))
    models = {}
    for role, p in prepared.items():
        median = statistics.median(per_round[role])
        models[role] = {k: v for k, v in p.items() if k != "step"}
        models[role].update(steps_per_round=steps[role], step_s_rounds=[round(t, 6) for t in per_round[role]],
                            step_s=round(median, 6), img_per_s=round(settings.batch_size / median, 2))
    ratio = statistics.median(per_round["base"]) / statistics.median(per_round["stvit"])
    return {"metric": "img/s", "batch_size": settings.batch_size, "models": models, "speedup": round(ratio, 3),
            "_steps": {role: p["step"] for role, p in prepared.items()}}


def _measure_latency(pair: Pair, settings: Settings, device: Any) -> Dict[str, Any]:
    prepared = _prepare(pair, settings, device, settings.latency_batch_size)
    samples: Dict[str, List[float]] = {role: [] for role in prepared}
    for order in _alternating(list(prepared), settings.rounds):
        for role in order:
            samples[role].extend(_timed_steps(prepared[role]["step"], 1)
                                 for _ in range(settings.latency_samples))
    models = {}
    for role, p in prepared.items():
        ordered = sorted(samples[role])
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        models[role] = {k: v for k, v in p.items() if k != "step"}
        models[role].update(samples=len(ordered), p50_ms=round(statistics.median(ordered) * 1e3, 4),
                            p95_ms=round(p95 * 1e3, 4))
    ratio = models["base"]["p50_ms"] / models["stvit"]["p50_ms"]
    return {"metric": "latency", "batch_size": settings.latency_batch_size, "models": models,
            "speedup": round(ratio, 3), "p95_ratio": round(models["base"]["p95_ms"] / models["stvit"]["p95_ms"], 3),
            "_steps": {role: p["step"] for role, p in prepared.items()}}


def _onnx_skip_reason(settings: Settings) -> Optional[str]:
    if settings.device != "cuda":
        return "ONNX Runtime's CUDA execution provider is only measured with --device cuda"
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (has {', '.join(providers)})"
    return None


def _measure_onnx(pair: Pair, settings: Settings, device: Any) -> Dict[str, Any]:
    import numpy as np
    import onnxruntime
    import torch

    per_round: Dict[str, List[float]] = {}
    models: Dict[str, Dict[str, Any]] = {}
    runs: Dict[str, Callable[[], Any]] = {}
    workdir = tempfile.mkdtemp(prefix="stvit-onnx-")
    for role, name in (("stvit", pair.stvit), ("base", pair.base)):
        kwargs = _model_kwargs(pair, name, settings)
        x = torch.randn(settings.batch_size, 3, kwargs["img_size"], kwargs["img_size"], device=device)
        model = _build_model(name, kwargs, device).eval()
        path = os.path.join(workdir, f"{role}.onnx")
        start = time.perf_counter()
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"], output_names=["y"])
        session = onnxruntime.InferenceSession(path, providers=[("CUDAExecutionProvider",
                                                                 {"device_id": device.index or 0})])
        binding = session.io_binding()
        binding.bind_input("x", "cuda", device.index or 0, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output("y", "cuda", device.index or 0)

        def run(session: Any = session, binding: Any = binding, keep: Any = x) -> None:
            session.run_with_iobinding(binding)

        for _ in range(settings.warmup):
            run()
        models[role] = {"model": name, "model_kwargs": _jsonable(kwargs), "export_and_warmup_s": round(time.perf_counter() - start, 3),
                        "peak_memory_mb": None, "providers": session.get_providers()}
        runs[role], per_round[role] = run, []
        del model
    steps = {role: max(1, math.ceil(settings.min_round_time / max(_timed_steps(run, 1), 1e-9)))
             for role, run in runs.items()}
    for order in _alternating(list(runs), settings.rounds):
        for role in order:
            per_round[role].append(_timed_steps(runs[role], steps[role]))
    for role in runs:
        median = statistics.median(per_round[role])
        models[role].update(steps_per_round=steps[role], step_s_rounds=[round(t, 6) for t in per_round[role]],
                            step_s=round(median, 6), img_per_s=round(settings.batch_size / median, 2))
    ratio = statistics.median(per_round["base"]) / statistics.median(per_round["stvit"])
    return {"metric": "img/s", "dtype": "fp32", "batch_size": settings.batch_size, "models": models,
            "speedup": round(ratio, 3)}


def _embedded_images(split: str) -> List[Path]:
    """The embedded Fashion-MNIST images of ``split``, the classes taking turns (any prefix holds every class)."""
    from stvit_core.data import embedded_dataset_path

    classes = [sorted(d.glob("*.png")) for d in sorted((embedded_dataset_path() / split).iterdir()) if d.is_dir()]
    return [images[i] for i in range(max(map(len, classes))) for images in classes if i < len(images)]


def _write_jpeg_folder(folder: Path, count: int, val_count: int, size: int) -> None:
    """An ImageFolder of ``count`` training and ``val_count`` validation JPEGs at ``size`` px: the embedded
    Fashion-MNIST images in turn (as RGB, upscaled), each written as its own file, as a user's data would be."""
    from PIL import Image

    for split, n in (("train", count), ("val", val_count)):
        sources = _embedded_images(split)
        for i in range(n):
            source = sources[i % len(sources)]
            target = folder / split / source.parent.name / f"{i:06d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(source) as image:
                image.convert("RGB").resize((size, size), Image.BICUBIC).save(target, quality=90)


def _train_run(model: Any, data: Path, output: Path, settings: Settings, **overrides: Any) -> List[Dict[str, Any]]:
    """``model`` trained as ``stvit finetune`` trains it (stvit_core.train); the row of every epoch."""
    from stvit_core.train import resolve_config, train

    cfg = resolve_config(overrides=dict(
        data=str(data), output=str(output), workers=settings.workers, device=settings.device, quiet=True,
        amp=None if settings.dtype == "fp32" else settings.dtype, **overrides))
    rows: List[Dict[str, Any]] = []
    train(cfg, model, force=True, on_epoch_end=rows.append)
    return rows


def _measure_finetune(pair: Pair, settings: Settings, device: Any) -> Dict[str, Any]:
    """Two epochs of fine-tuning over JPEG files through the command's data loader (the second is timed: the
    first pays cuDNN's autotuning and the workers' start), then the same training step fed from memory."""
    import timm
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="stvit-finetune-"))
    start = time.perf_counter()
    _write_jpeg_folder(workdir / "data", settings.finetune_images, max(10, settings.finetune_images // 20),
                       settings.deit_img_size)
    write_s = time.perf_counter() - start
    models: Dict[str, Dict[str, Any]] = {}
    for role, name in (("stvit", pair.stvit), ("base", pair.base)):
        kwargs = {**_model_kwargs(pair, name, settings), "num_classes": 10}
        torch.manual_seed(0)
        rows = _train_run(timm.create_model(name, **kwargs), workdir / "data", workdir / role, settings, epochs=2,
                          batch_size=settings.batch_size, warmup_epochs=0)
        last = rows[-1]
        models[role] = {"model": name, "model_kwargs": _jsonable(kwargs), "epoch_s": round(last["epoch_seconds"], 3),
                        "img_per_s": round(last["train_img_per_sec"], 2),
                        "first_epoch_s": round(rows[0]["epoch_seconds"], 3)}
    memory = _measure_throughput(replace(pair, kind="train"), settings, device)
    memory.pop("_steps")
    for role in models:
        models[role]["from_memory_img_per_s"] = memory["models"][role]["img_per_s"]
        models[role]["peak_memory_mb"] = memory["models"][role]["peak_memory_mb"]
        models[role]["loader_share"] = round(1 - models[role]["img_per_s"] / models[role]["from_memory_img_per_s"], 3)
    return {"metric": "img/s", "batch_size": settings.batch_size, "models": models,
            "speedup": round(models["stvit"]["img_per_s"] / models["base"]["img_per_s"], 3),
            "from_memory_speedup": memory["speedup"], "images": settings.finetune_images,
            "workers": settings.workers, "write_jpegs_s": round(write_s, 1)}


def _fashion_mnist_folder(source: Optional[str], folder: Path) -> Path:
    """The full Fashion-MNIST (60,000 train / 10,000 test) as an ImageFolder of PNGs under ``folder``, from the
    IDX files of Debian's dataset-fashion-mnist; ``None`` (--quick): 40 / 20 images of the embedded subset."""
    import importlib.util
    import shutil

    from PIL import Image

    if source is None:
        for split, count in (("train", 40), ("val", 20)):
            for image in _embedded_images(split)[:count]:
                (folder / split / image.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(image, folder / split / image.parent.name / image.name)
        return folder
    spec = importlib.util.spec_from_file_location("make_fashion_mnist_subset",
                                                  REPO_ROOT / "benchmarks" / "make_fashion_mnist_subset.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = builder.read_idx(Path(source) / f"{prefix}-images-idx3-ubyte.gz")
        labels = builder.read_idx(Path(source) / f"{prefix}-labels-idx1-ubyte.gz")
        for name in builder.CLASS_NAMES:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(folder / split / builder.CLASS_NAMES[label] / f"{split}_{i:05d}.png")
    return folder


def _parity_skip_reason(settings: Settings) -> Optional[str]:
    if settings.fashion_mnist is None:
        return None
    missing = [n for n in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
               if not (Path(settings.fashion_mnist) / n).is_file()]
    if missing:
        return (f"--fashion-mnist {settings.fashion_mnist} has no {missing[0]} (apt-get install dataset-fashion-mnist, "
                "or pass the folder of its .gz files)")
    return None


PARITY_MODEL = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3, "num_classes": 10}
PARITY_RECIPE = {"lr": 1e-3, "warmup_epochs": 2, "min_lr": 1e-5, "weight_decay": 0.05, "clip_grad": 5.0,
                 "smoothing": 0.1, "scale_min": 0.8, "drop_path": 0.0, "batch_size": 128}


def _measure_parity(pair: Pair, settings: Settings, device: Any) -> Dict[str, Any]:
    """DeiT-Tiny's layout and STViT-DeiT-Tiny (16 tokens) trained from scratch on Fashion-MNIST (32 px, patch 4:
    64 image tokens), the same recipe (benchmarks/fashion_mnist_recipe.py's, on the full set) for every seed."""
    import timm
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="stvit-parity-"))
    start = time.perf_counter()
    data = _fashion_mnist_folder(settings.fashion_mnist, workdir / "data")
    write_s = time.perf_counter() - start
    model_kwargs = dict(PARITY_MODEL, **({"embed_dim": 8, "num_heads": 1} if settings.quick else {}))
    recipe = dict(PARITY_RECIPE, epochs=settings.parity_epochs, **({"batch_size": 8} if settings.quick else {}))
    models: Dict[str, Dict[str, Any]] = {}
    for role, name in (("stvit", pair.stvit), ("base", pair.base)):
        kwargs = dict(model_kwargs, **({"num_semantic_tokens": 16} if role == "stvit" else {}))
        top1, seconds = [], []
        for seed in range(settings.parity_seeds):
            torch.manual_seed(seed)
            rows = _train_run(timm.create_model(name, **kwargs), data, workdir / f"{role}_{seed}", settings,
                              seed=seed, **recipe)
            top1.append(round(rows[-1]["top1"], 2))
            seconds.append(round(sum(r["epoch_seconds"] for r in rows), 1))
        models[role] = {"model": name, "model_kwargs": _jsonable(kwargs), "top1_seeds": top1,
                        "top1_mean": round(statistics.fmean(top1), 2),
                        "top1_std": round(statistics.stdev(top1), 2) if len(top1) > 1 else None,
                        "train_s_seeds": seconds, "peak_memory_mb": None}
    gap = models["stvit"]["top1_mean"] - models["base"]["top1_mean"]
    return {"metric": "top1", "batch_size": recipe["batch_size"], "models": models, "top1_gap": round(gap, 2),
            "within_0_5": gap >= -0.5, "recipe": recipe, "seeds": settings.parity_seeds,
            "train_images": sum(1 for _ in (Path(data) / "train").glob("*/*")), "write_images_s": round(write_s, 1)}


def _profile_tables(steps: Dict[str, Callable[[], Any]], settings: Settings, device: Any) -> Dict[str, str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    tables = {}
    for role, step in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(settings.profile_steps):
                step()
            _sync(device)
        tables[role] = prof.key_averages().table(sort_by=sort_by, row_limit=25)
    return tables


def run_pair(pair: Pair, settings: Settings) -> Dict[str, Any]:
    """Everything measured for one pair (runs inside the pair's own process)."""
    import torch

    from stvit_core.device import resolve_device

    injected = os.environ.get(INJECT_FAILURE_ENV, "").split(",")
    if f"{pair.name}:exit" in injected:
        os._exit(3)
    if pair.name in injected:
        raise RuntimeError(f"injected failure ({INJECT_FAILURE_ENV})")
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if pair.kind == "onnx":
        reason = _onnx_skip_reason(settings)
        if reason:
            return {"status": "skipped", "reason": reason}
        result = _measure_onnx(pair, settings, device)
    elif pair.kind == "latency":
        result = _measure_latency(pair, settings, device)
    elif pair.kind == "finetune":
        result = _measure_finetune(pair, settings, device)
    elif pair.kind == "parity":
        reason = _parity_skip_reason(settings)
        if reason:
            return {"status": "skipped", "reason": reason}
        result = _measure_parity(pair, settings, device)
    else:
        result = _measure_throughput(pair, settings, device)
    steps = result.pop("_steps", {})
    if pair.compile:  # what torch.compile was asked for (another --compile-backend takes no inductor mode)
        inductor = settings.compile_backend == "inductor"
        result["compile"] = {"backend": settings.compile_backend,
                             "mode": (_compile_mode(pair, settings) or "default") if inductor else None}
    result["status"] = "ok"
    result["met"] = (result["within_0_5"] if pair.kind == "parity" else
                     None if pair.target is None else bool(result["speedup"] >= pair.target))
    if settings.profile == "all" or (settings.profile == "misses" and result["met"] is False):
        result["profile"] = _profile_tables(steps, settings, device)
    return result


def _worker(task: str, pair_name: Optional[str], settings: Settings, result_path: str) -> None:
    """Process entry: writes {'status': ..., ...} to result_path; never raises (the parent reads the file)."""
    try:
        if task == "env":
            result = {"status": "ok", "environment": environment_info(settings)}
        else:
            result = run_pair(next(p for p in PAIRS if p.name == pair_name), settings)
    except BaseException as exc:  # noqa: BLE001  (a pair's failure is one line in the results, never a crash)
        result = {"status": "error", "error": _one_line(exc)}
    Path(result_path).write_text(json.dumps(result, default=str))


# ----------------------------------------------------------------------------------------------------------
# Parent side: no torch import; starts one process per pair, keeps time, writes the results
# ----------------------------------------------------------------------------------------------------------

def _run_in_process(ctx: Any, task: str, pair_name: Optional[str], settings: Settings, timeout: float) -> Dict[str, Any]:
    fd, result_path = tempfile.mkstemp(prefix="stvit-gpu-suite-", suffix=".json")
    os.close(fd)
    try:
        process = ctx.Process(target=_worker, args=(task, pair_name, settings, result_path))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            return {"status": "error", "error": f"timed out after {timeout:.0f} s (--pair-timeout / --time-budget)"}
        text = Path(result_path).read_text()
        if not text:
            return {"status": "error", "error": f"pair process exited with code {process.exitcode} and no result"}
        return json.loads(text)
    finally:
        os.unlink(result_path)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the results private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _fmt_model(pair_result: Dict[str, Any], role: str) -> str:
    m = pair_result["models"][role]
    if pair_result["metric"] == "latency":
        return f"{m['p50_ms']:.3g} / {m['p95_ms']:.3g} ms"
    if pair_result["metric"] == "top1":
        std = "" if m["top1_std"] is None else f" ± {m['top1_std']:.2f}"
        return f"{m['top1_mean']:.2f}{std} % top-1 ({len(m['top1_seeds'])} seeds)"
    if "from_memory_img_per_s" in m:
        return f"{m['img_per_s']:.4g} img/s (from memory {m['from_memory_img_per_s']:.4g})"
    return f"{m['img_per_s']:.4g} img/s"


def _fmt_ratio(pair_result: Dict[str, Any]) -> str:
    if pair_result["metric"] == "top1":
        return f"{pair_result['top1_gap']:+.2f} points"
    if "from_memory_speedup" in pair_result:
        return f"{pair_result['speedup']:.2f}x (from memory {pair_result['from_memory_speedup']:.2f}x)"
    return f"{pair_result['speedup']:.2f}x"


def _fmt_memory(pair_result: Dict[str, Any]) -> str:
    values = [pair_result["models"][role].get("peak_memory_mb") for role in ("stvit", "base")]
    if any(v is None for v in values):
        return "n/a"
    return " / ".join(f"{v:.0f}" for v in values)


def markdown_table(report: Dict[str, Any]) -> str:
    env, settings = report.get("environment") or {}, report["settings"]
    lines = [
        f"GPU suite on {env.get('device_name', '?')} ({report['settings']['device']}), torch {env.get('torch', '?')}, "
        f"CUDA {env.get('cuda')}, timm {env.get('timm', '?')}, {report['date']}; "
        f"{'fp32, no autocast' if settings['dtype'] == 'fp32' else settings['dtype'] + ' autocast'}, "
        f"{settings['deit_img_size']} px (Swin {settings['swin_img_size']} px), random weights, "
        f"median of {settings['rounds']} alternating rounds"
        + (" (--quick: tiny widths and sizes, not figures)" if settings["quick"] else "") + ".",
        "",
        f"`{report['command']}`",
        "",
        "| pair | measure | batch | STViT | base | speedup | target | met | peak memory STViT / base (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in PAIRS:
        if pair.name not in report["pairs"]:
            continue
        r = report["pairs"][pair.name]
        measure = {"latency": "p50 / p95 latency", "parity": "accuracy", "finetune": "epoch throughput"}.get(
            pair.kind, "throughput")
        if r["status"] == "ok":
            met = "n/a" if r["met"] is None else ("met" if r["met"] else "**missed**")
            lines.append(f"| {pair.label} | {measure} | {r['batch_size']} | {_fmt_model(r, 'stvit')} | "
                         f"{_fmt_model(r, 'base')} | {_fmt_ratio(r)} | {pair.target_text} | {met} | "
                         f"{_fmt_memory(r)} |")
        else:
            why = r.get("error") or r.get("reason", "")
            why = why.replace("|", "/")
            lines.append(f"| {pair.label} | {measure} | | {r['status']}: {why} | | | {pair.target_text} | "
                         f"{'n/a' if r['status'] == 'skipped' else '**failed**'} | |")
    return "\n".join(lines) + "\n"


def profile_markdown(report: Dict[str, Any]) -> Optional[str]:
    parts = []
    for name, r in report["pairs"].items():
        for role, table in (r.get("profile") or {}).items():
            model = r["models"][role]["model"]
            parts.append(f"## {name}: {role} ({model}), {_fmt_ratio(r)}\n\n```\n{table}\n```\n")
    return "\n".join(parts) if parts else None


def write_outputs(report: Dict[str, Any], stem: Path) -> List[Path]:
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    tables_elsewhere = {name: {k: v for k, v in r.items() if k != "profile"} for name, r in report["pairs"].items()}
    _atomic_write(paths[0], json.dumps({**report, "pairs": tables_elsewhere}, indent=2, default=str) + "\n")
    _atomic_write(paths[1], markdown_table(report))
    profile = profile_markdown(report)
    if profile is not None:
        paths.append(stem.parent / f"{stem.name}_profile.md")
        _atomic_write(paths[-1], profile)
    return paths


def _check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SuiteError(f"--output-dir {path}: cannot write there ({exc.strerror or exc})") from None


def plan(args: argparse.Namespace, settings: Settings) -> List[Pair]:
    selected = [p for p in PAIRS if p.name in args.only] if args.only is not None else \
        [p for p in PAIRS if args.training or not p.training]
    total = sum(p.estimate_s for p in selected)
    print(f"gpu_suite: {len(selected)} pair(s); estimated {total:.0f} s on one H200 at the default settings "
          f"(budget {args.time_budget:.0f} s)", flush=True)
    for p in selected:
        print(f"  {p.name:<16} ~{p.estimate_s:>4.0f} s  {p.label}", flush=True)
    return selected


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    output_dir = Path(args.output_dir)
    try:
        _check_output_dir(output_dir)
    except SuiteError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    selected = plan(args, settings)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(HEAVY_MODULES)  # imported once; every pair's process is forked from it
    started = time.perf_counter()
    env_result = _run_in_process(ctx, "env", None, settings, args.pair_timeout)
    if env_result["status"] != "ok":
        message = env_result["error"].split(": ", 1)[-1] if "InvalidArgument" in env_result["error"] else env_result["error"]
        print(f"Error: {message}", file=sys.stderr)
        return 2
    env = env_result["environment"]
    date = datetime.datetime.now(datetime.timezone.utc)
    name = f"gpu_{slug(env['device_name'] if settings.device == 'cuda' else 'cpu')}_{date:%Y-%m-%d}"
    if args.only is not None:
        name += "_only-" + "-".join(args.only)
    stem = output_dir / name
    report: Dict[str, Any] = {
        "suite": "benchmarks/gpu_suite.py", "date": date.isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "environment": env,
        "settings": asdict(settings), "time_budget_s": args.time_budget, "pairs": {},
    }
    print(f"gpu_suite: {env['device_name']}, torch {env['torch']}, CUDA {env['cuda']}, timm {env['timm']} "
          f"(environment {time.perf_counter() - started:.1f} s)", flush=True)
    for pair in selected:
        elapsed = time.perf_counter() - started
        remaining = args.time_budget - elapsed
        if args.skip_compile and pair.compile:
            result = {"status": "skipped", "reason": "--skip-compile"}
        elif remaining < 10:
            result = {"status": "skipped", "reason": f"time budget spent ({elapsed:.0f} of {args.time_budget:.0f} s)"}
        else:
            if remaining < pair.estimate_s and settings.device == "cuda" and not settings.quick:
                print(f"  warning: {remaining:.0f} s left, {pair.name} is estimated at {pair.estimate_s:.0f} s",
                      flush=True)
            pair_start = time.perf_counter()
            # a training pair is whole training runs: it may take twice its estimate whatever --pair-timeout says
            limit = max(args.pair_timeout, 2 * pair.estimate_s) if pair.training else args.pair_timeout
            result = _run_in_process(ctx, "pair", pair.name, settings, min(limit, remaining))
            result["elapsed_s"] = round(time.perf_counter() - pair_start, 2)
        report["pairs"][pair.name] = {"label": pair.label, "stvit": pair.stvit, "base": pair.base,
                                      "target": pair.target, "target_text": pair.target_text, **result}
        report["elapsed_s"] = round(time.perf_counter() - started, 2)
        paths = write_outputs(report, stem)
        print(f"  {pair.name:<16} {_summary(result)}  [{result.get('elapsed_s', 0):.1f} s, "
              f"total {report['elapsed_s']:.1f} s]", flush=True)
    if not selected:
        paths = write_outputs(report, stem)
    print(f"gpu_suite: done in {time.perf_counter() - started:.1f} s; wrote {', '.join(map(str, paths))}", flush=True)
    failed = [name for name, r in report["pairs"].items() if r["status"] == "error"]
    if failed:  # the others were measured and written; the exit status still says that not everything ran
        print(f"gpu_suite: {len(failed)} pair(s) failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


def _summary(result: Dict[str, Any]) -> str:
    if result["status"] == "ok":
        met = "" if result["met"] is None else (" met" if result["met"] else " MISSED")
        return f"{_fmt_ratio(result)}{met}"
    return f"{result['status']}: {result.get('error') or result.get('reason')}"


if __name__ == "__main__":
    sys.exit(main())
