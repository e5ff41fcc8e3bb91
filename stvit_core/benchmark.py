"""Side-by-side throughput of a base model and its STViT version.

Both models are built the same way, put on the same device and dtype, compiled (or not) the same way, and
timed in one process with ``torch.utils.benchmark.Timer`` (CUDA synchronised, warm-up excluded, the thread
count of the process). The models alternate round by round so that machine noise (other processes, clock
changes) hits both; each model's figure is the median over rounds.

``runtime='onnxruntime'`` times both models exported to ONNX (dynamic batch, ``stvit_core.export``) and run by
onnxruntime in the same process, with the same alternating rounds and the same result schema. With
``latency=True`` every step is timed on its own, which gives the p50/p95 latency of a batch as well
(:func:`benchmark_batch_sizes` does this for several batch sizes, :func:`plot_batch_sizes` draws it).

A result says how far it can be trusted: the speedup of every round (the rounds are paired, so each round's
ratio is a speedup measured under the same conditions for both models), their spread, and a one-line warning
(:func:`speedup_warning`) when the rounds disagree or the speedup is far above the FLOPs ratio.
"""

from __future__ import annotations

import io
import math
import os
import statistics
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.utils.model import reparameterize_model
from torch.utils.benchmark import Timer

from .checkpoint import names_a_saved_model
from .device import resolve_device
from .env import memory_allocator
from .errors import InvalidArgumentError, require_extra
from .export import to_onnx, trace_model
from .files import atomic_write_bytes
from .flops import count_flops, count_params
from .layers import use_patch_gemm
from .loading import architecture_of, base_model_for, load_model
from .onnx_runtime import ONNX_MODULES, onnx_providers, onnx_session

__all__ = ["RUNTIMES", "BenchmarkSettings", "benchmark_batch_sizes", "benchmark_models", "benchmark_pair",
           "check_settings", "make_step", "model_label", "models_for_benchmark", "plot_batch_sizes",
           "speedup_spread", "speedup_warning", "step_factories"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUNTIMES = ("torch", "onnxruntime")
# When a speedup is not to be trusted: its rounds disagree by more than this factor (max / min of the per-round
# speedups), or it is more than this many times the FLOPs ratio (a model that does fewer FLOPs per image is
# rarely faster by much more than it saves; far more is another process slowing the base model's rounds).
SPREAD_WARNING = 1.25
FLOPS_RATIO_WARNING = 1.5


@dataclass
class BenchmarkSettings:
    batch_size: int = 32
    device: Optional[str] = None  # None / 'auto': CUDA when available, else CPU
    dtype: str = "float32"
    bench: str = "inference"  # 'inference' or 'train' (forward + backward + optimizer step)
    compile: bool = False
    cuda_graphs: bool = False
    channels_last: bool = False
    warmup: int = 2
    rounds: int = 5
    min_round_time: float = 1.0  # seconds of work per model per round; sets the steps per round
    runtime: str = "torch"  # or 'onnxruntime': both models exported to ONNX
    latency: bool = False  # time every step on its own: p50/p95 latency of a batch besides throughput
    patch_gemm: bool = False  # both models' patch embeddings as a gather + GEMM (stvit_core.layers.use_patch_gemm)
    reparam: bool = False  # both models reparameterised for inference (timm's reparameterize_model: folded BatchNorm)


def check_settings(settings: BenchmarkSettings) -> torch.device:
    """Raise a one-line error for settings this machine or torch cannot run; returns the device."""
    if settings.dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {settings.dtype!r} (expected {', '.join(DTYPES)})")
    if settings.bench not in ("inference", "train"):
        raise InvalidArgumentError(f"unknown benchmark {settings.bench!r} (expected inference or train)")
    for name, value, low in (("batch_size", settings.batch_size, 1), ("rounds", settings.rounds, 1),
                             ("warmup", settings.warmup, 0)):
        if value < low:
            raise InvalidArgumentError(f"{{{name}}} must be at least {low}, got {value}", **{name: value})
    if not settings.min_round_time > 0:
        raise InvalidArgumentError(f"{{min_round_time}} must be positive, got {settings.min_round_time}",
                                   min_round_time=settings.min_round_time)
    if settings.runtime not in RUNTIMES:
        raise InvalidArgumentError(f"unknown runtime {settings.runtime!r} (expected {' or '.join(RUNTIMES)})")
    if settings.runtime == "onnxruntime":
        return _check_onnxruntime_settings(settings)
    if settings.reparam and settings.bench != "inference":  # folded BatchNorm has no statistics left to train
        raise InvalidArgumentError("{reparam=} applies to inference only, not {bench=}", reparam=True, bench=settings.bench)
    device = resolve_device(settings.device)
    if settings.cuda_graphs and device.type != "cuda":
        raise InvalidArgumentError("{cuda_graphs=} needs a CUDA device", cuda_graphs=True)
    return device


def _check_onnxruntime_settings(settings: BenchmarkSettings) -> torch.device:
    """onnxruntime runs the exported inference graph in float32: torch-only settings cannot apply."""
    torch_only = {"bench": settings.bench != "inference", "dtype": settings.dtype != "float32",
                  "compile": settings.compile, "cuda_graphs": settings.cuda_graphs,
                  "channels_last": settings.channels_last, "patch_gemm": settings.patch_gemm}
    given = {name: getattr(settings, name) for name, is_set in torch_only.items() if is_set}
    if given:
        fields = ", ".join(f"{{{name}=}}" for name in given)
        raise InvalidArgumentError(f"{fields} cannot apply to {{runtime=}} (it runs the exported float32 inference "
                                   "graph)", runtime="onnxruntime", **given)
    require_extra("export", ONNX_MODULES, "the onnxruntime benchmark")
    first = onnx_providers(settings.device)[0]
    name, options = first if isinstance(first, tuple) else (first, {})
    return torch.device("cpu") if name == "CPUExecutionProvider" else torch.device("cuda", options.get("device_id", 0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, x: torch.Tensor, *, train: bool = False, dtype: torch.dtype = torch.float32,
              compile: bool = False, compile_mode: Optional[str] = None, compile_backend: str = "inductor",
              fused_optimizer: bool = False) -> Callable[[], Any]:
    """The step to time on batch ``x``: an inference forward, or (``train``) forward + backward + AdamW.

    ``dtype`` other than float32 autocasts (on the CPU too: not stvit_core.device.autocast, a no-op off CUDA).
    ``compile`` wraps the model in ``torch.compile`` with inductor's ``compile_mode`` or another
    ``compile_backend`` (which takes no mode); with ``compile_mode='reduce-overhead'`` on CUDA each step marks a
    new CUDA-graph iteration. Shared by :func:`benchmark_models` and benchmarks/gpu_suite.py.
    """
    device = x.device
    autocast = torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    runner: nn.Module = model
    if compile:
        inductor = compile_backend == "inductor"
        runner = torch.compile(model, mode=compile_mode) if inductor else torch.compile(model, backend=compile_backend)
    graphs = compile and compile_backend == "inductor" and compile_mode == "reduce-overhead" and device.type == "cuda"
    if not train:
        model.eval()

        def step() -> Any:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode(), autocast:
                return runner(x)

        return step

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused_optimizer or None)
    num_classes = getattr(model, "num_classes", 1000) or 1000
    target = torch.randint(0, num_classes, (x.shape[0],), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> Any:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = loss_fn(runner(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return train_step


def _make_step(model: nn.Module, x: torch.Tensor, settings: BenchmarkSettings) -> Callable[[], Any]:
    return make_step(model, x, train=settings.bench == "train", dtype=DTYPES[settings.dtype],
                     compile=settings.compile or settings.cuda_graphs,
                     compile_mode="reduce-overhead" if settings.cuda_graphs else None)


def _timer(step: Callable[[], Any]) -> Any:
    # Timer would time on one thread by default; measure with the threads the process runs with
    return Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())


def _onnx_session(model: nn.Module, input_size: Sequence[int], settings: BenchmarkSettings) -> Any:
    """``model`` exported to ONNX with a dynamic batch (as ``stvit export`` does) in an onnxruntime session."""
    example = torch.randn(2, *input_size)
    program = trace_model(model.eval().cpu(), example, dynamic_batch=True)
    proto = to_onnx(program, example, output_names=["output"]).model_proto.SerializeToString()
    return onnx_session(proto, providers=onnx_providers(settings.device))


StepFactory = Callable[[torch.Tensor], Callable[[], Any]]


def _onnx_step_factory(session: Any) -> StepFactory:
    feed = session.get_inputs()[0].name

    def factory(x: torch.Tensor) -> Callable[[], Any]:
        inputs = {feed: x.cpu().numpy()}
        return lambda: session.run(None, inputs)

    return factory


def step_factories(models: Dict[str, nn.Module], input_size: Sequence[int],
                   settings: BenchmarkSettings) -> Dict[str, StepFactory]:
    """For each model, what makes the step to time from an input batch (torch: the model itself, compiled or
    not; onnxruntime: its exported session, built once for every batch size)."""
    device = check_settings(settings)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    factories: Dict[str, StepFactory] = {}
    for name, model in models.items():
        if settings.runtime == "onnxruntime":
            factories[name] = _onnx_step_factory(_onnx_session(model, input_size, settings))
        else:
            model.to(device=device, memory_format=memory_format)
            factories[name] = lambda x, m=model: _make_step(m, x, settings)
    return factories


def benchmark_models(
    models: Dict[str, nn.Module],
    input_size: Sequence[int],
    settings: Optional[BenchmarkSettings] = None,
    factories: Optional[Dict[str, StepFactory]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Time each model on the same random batch; returns ``{name: {img_per_sec, peak_memory_mb, ...}}`` (and
    ``latency_ms`` with ``settings.latency``). ``factories``: from :func:`step_factories`, to reuse them."""
    settings = settings or BenchmarkSettings()
    device = check_settings(settings)
    factories = factories or step_factories(models, input_size, settings)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    x = torch.randn((settings.batch_size, *input_size), device=device).contiguous(memory_format=memory_format)
    timers, step_time, peak_memory = {}, {}, {}
    for name in models:
        step = factories[name](x)
        for _ in range(settings.warmup):  # compilation, allocator, cuDNN autotuning
            step()
        _sync(device)
        if device.type == "cuda" and settings.runtime == "torch":
            torch.cuda.reset_peak_memory_stats(device)
        timers[name] = _timer(step)
        step_time[name] = timers[name].timeit(1).mean  # sizes the rounds
        peak_memory[name] = (torch.cuda.max_memory_allocated(device) / 2**20
                             if device.type == "cuda" and settings.runtime == "torch" else None)
    iters = {n: max(1, math.ceil(settings.min_round_time / max(t, 1e-6))) for n, t in step_time.items()}
    rates, steps = _alternating_rounds(timers, iters, settings)
    results: Dict[str, Dict[str, Any]] = {}
    for name, r in rates.items():
        results[name] = {"img_per_sec": statistics.median(r), "img_per_sec_rounds": r,
                         "peak_memory_mb": peak_memory[name], "steps_per_round": iters[name]}
        if settings.latency:
            results[name]["latency_ms"] = _percentiles(steps[name])
    return results


def _alternating_rounds(timers: Dict[str, Any], iters: Dict[str, int], settings: BenchmarkSettings):
    """Rounds in which every model runs in turn: images/s per round and (latency mode) every step's seconds."""
    rates: Dict[str, List[float]] = {name: [] for name in timers}
    steps: Dict[str, List[float]] = {name: [] for name in timers}
    for _ in range(settings.rounds):
        for name, timer in timers.items():
            if settings.latency:  # each step on its own (synchronised): its time is the latency of a batch
                times = [timer.timeit(1).mean for _ in range(iters[name])]
                steps[name].extend(times)
                rates[name].append(settings.batch_size / statistics.fmean(times))
            else:
                rates[name].append(settings.batch_size / timer.timeit(iters[name]).mean)
    return rates, steps


def _percentiles(seconds: Sequence[float]) -> Dict[str, Any]:
    ms = np.asarray(seconds) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p95": round(float(np.percentile(ms, 95)), 3),
            "steps": len(ms)}


def benchmark_pair(
    base: nn.Module,
    stvit: nn.Module,
    settings: Optional[BenchmarkSettings] = None,
    input_size: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Benchmark ``base`` against ``stvit``; the result has the ``stvit benchmark --json`` schema."""
    settings = settings or BenchmarkSettings()
    return benchmark_batch_sizes(base, stvit, [settings.batch_size], settings, input_size)[0]


def benchmark_batch_sizes(
    base: nn.Module,
    stvit: nn.Module,
    batch_sizes: Sequence[int],
    settings: Optional[BenchmarkSettings] = None,
    input_size: Optional[Sequence[int]] = None,
) -> List[Dict[str, Any]]:
    """:func:`benchmark_pair` at each batch size (``settings.batch_size`` is ignored), the models prepared once
    (for onnxruntime: exported once, with a dynamic batch). One result per batch size, in order."""
    settings = settings or BenchmarkSettings()
    for batch_size in batch_sizes:
        check_settings(replace(settings, batch_size=batch_size))
    device = check_settings(settings)
    input_size = tuple(input_size or stvit.pretrained_cfg.get("input_size", (3, 224, 224)))
    flops = {"base": count_flops(base, input_size), "stvit": count_flops(stvit, input_size)}
    params = {"base": count_params(base), "stvit": count_params(stvit)}
    models = {"base": base, "stvit": stvit}
    for model in models.values():  # speed steps are given to both models alike (in place), so the ratio stays fair
        if settings.patch_gemm:
            use_patch_gemm(model)
        if settings.reparam:
            reparameterize_model(model, inplace=True)
    factories = step_factories(models, input_size, settings)
    results = []
    for batch_size in batch_sizes:
        batch_settings = replace(settings, batch_size=batch_size)
        timings = benchmark_models(models, input_size, batch_settings, factories)
        results.append(_pair_result(batch_settings, device, input_size, flops, params, timings))
    return results


def _pair_result(settings: BenchmarkSettings, device: torch.device, input_size: Sequence[int],
                 flops: Dict[str, float], params: Dict[str, int], timings: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "device": _device_name(device),
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "bench": settings.bench,
        "runtime": settings.runtime,
        "compile": settings.compile,
        "cuda_graphs": settings.cuda_graphs,
        "channels_last": settings.channels_last,
        "patch_gemm": settings.patch_gemm,
        "reparam": settings.reparam,
        "input_size": list(input_size),
        "threads": torch.get_num_threads(),
        "memory_allocator": memory_allocator(),
        "torch": torch.__version__,
    }
    if settings.runtime == "onnxruntime":
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    for name in ("base", "stvit"):
        t = timings[name]
        out[name] = {
            "params_m": round(params[name] / 1e6, 3),
            "gflops": round(flops[name], 4),
            "img_per_sec": round(t["img_per_sec"], 2),
            "peak_memory_mb": None if t["peak_memory_mb"] is None else round(t["peak_memory_mb"], 1),
        }
        if "latency_ms" in t:
            out[name]["latency_ms"] = t["latency_ms"]
    out["speedup"] = round(out["stvit"]["img_per_sec"] / out["base"]["img_per_sec"], 3)
    out["flops_ratio"] = round(flops["base"] / flops["stvit"], 3)
    rounds = [s / b for b, s in zip(timings["base"]["img_per_sec_rounds"], timings["stvit"]["img_per_sec_rounds"])]
    out["speedup_rounds"] = [round(r, 3) for r in rounds]
    out["speedup_spread"] = {k: round(v, 3) for k, v in speedup_spread(rounds).items()}
    if settings.latency:
        out["latency_speedup_p50"] = round(out["base"]["latency_ms"]["p50"] / out["stvit"]["latency_ms"]["p50"], 3)
    warning = speedup_warning(rounds, out["speedup"], out["flops_ratio"])
    out["warnings"] = [warning] if warning else []
    return out


def speedup_spread(rounds: Sequence[float]) -> Dict[str, float]:
    """``{min, q1, q3, max}`` of the per-round speedups (q1 and q3: the quartiles, inclusive of the ends)."""
    if len(rounds) == 1:
        q1 = q3 = rounds[0]
    else:
        q1, _, q3 = statistics.quantiles(rounds, n=4, method="inclusive")
    return {"min": min(rounds), "q1": q1, "q3": q3, "max": max(rounds)}


def speedup_warning(rounds: Sequence[float], speedup: float, flops_ratio: float) -> Optional[str]:
    """One line saying why ``speedup`` should not be trusted, or None: its per-round speedups ``rounds`` disagree
    (max / min above :data:`SPREAD_WARNING`), or it exceeds ``flops_ratio`` by more than
    :data:`FLOPS_RATIO_WARNING` times. Both usually mean other work on the machine during the rounds."""
    reasons = []
    if min(rounds) > 0 and max(rounds) / min(rounds) > SPREAD_WARNING:
        reasons.append(f"its {len(rounds)} rounds range from {min(rounds):.2f}x to {max(rounds):.2f}x")
    if flops_ratio > 0 and speedup > FLOPS_RATIO_WARNING * flops_ratio:
        reasons.append(f"it is {speedup / flops_ratio:.1f} times the FLOPs ratio {flops_ratio:.2f}x")
    if not reasons:
        return None
    return (f"speedup {speedup:.2f}x is unreliable: {' and '.join(reasons)} (other work on the machine?); "
            "rerun on an idle machine or with more rounds")


def plot_batch_sizes(results: Sequence[Dict[str, Any]], path: Union[str, os.PathLike],
                     labels: Tuple[str, str] = ("base", "STViT")) -> Path:
    """A PNG of throughput and p50 latency (p95 as the bar's top) against batch size for both models, written
    atomically. ``results``: :func:`benchmark_batch_sizes` with ``latency=True``."""
    require_extra("plot", ("matplotlib",), "the plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    throughput, latency = figure.subplots(1, 2)
    batches = [r["batch_size"] for r in results]
    for key, label, marker in (("base", labels[0], "o"), ("stvit", labels[1], "s")):
        throughput.plot(batches, [r[key]["img_per_sec"] for r in results], marker=marker, label=label)
        p50 = [r[key]["latency_ms"]["p50"] for r in results]
        p95 = [r[key]["latency_ms"]["p95"] for r in results]
        latency.errorbar(batches, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95)]], marker=marker,
                         capsize=3, label=f"{label} (p50, bar to p95)")
    first = results[0]
    throughput.set(xscale="log", xlabel="batch size", ylabel="images / s", title="throughput")
    latency.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per batch", title="latency of a batch")
    for axes in (throughput, latency):
        axes.set_xticks(batches, [str(b) for b in batches])
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"{first['runtime']} | {first['device']} | {first['dtype']} | {first['threads']} threads")
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def model_label(model: nn.Module) -> str:
    """What ``model`` is, for a table or a plot's legend: its architecture and, in brackets, its semantic tokens
    and where its shape departs from what the name says (input size, patch size, width), e.g.
    ``stvit_deit_small_patch16_224 (16 tokens)`` or ``deit_tiny_patch16_224 (32 px, patch 8, width 48)``."""
    arch = architecture_of(model)
    details = []
    if getattr(model, "num_semantic_tokens", None):
        details.append(f"{model.num_semantic_tokens} tokens")
    if getattr(model, "semantic_tokens_per_window", None):
        details.append(f"{model.semantic_tokens_per_window} tokens per window")
    details += _departures_from_name(model, arch)
    return f"{arch} ({', '.join(details)})" if details else arch


def _shape(model: nn.Module) -> Dict[str, Any]:
    embed = getattr(model, "patch_embed", None)
    patch, px = getattr(embed, "patch_size", None), getattr(embed, "img_size", None)  # as built, not as tagged
    px = px or (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,))[1:]
    return {"px": (px, px) if isinstance(px, int) else tuple(px) if px else None,
            "patch": (patch, patch) if isinstance(patch, int) else tuple(patch) if patch else None,
            "width": getattr(model, "embed_dim", None)}


def _departures_from_name(model: nn.Module, arch: str) -> List[str]:
    """Input size, patch size and width where ``model`` differs from ``arch`` as registered (a saved model built
    with other ``model_args``), e.g. ``['32 px', 'patch 8']``."""
    try:
        with torch.device("meta"):  # the registered shape, without allocating weights
            default = _shape(timm.create_model(arch, pretrained=False))
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # not a registered name: nothing to compare
        return []
    shape = _shape(model)
    size = lambda v, unit: f"{'x'.join(map(str, v)) if len(set(v)) > 1 else v[0]}{unit}"  # noqa: E731
    out = []
    if shape["px"] and shape["px"] != default["px"]:
        out.append(size(shape["px"], " px"))
    if shape["patch"] and shape["patch"] != default["patch"]:
        out.append("patch " + size(shape["patch"], ""))
    if shape["width"] and shape["width"] != default["width"]:
        out.append(f"width {shape['width']}")
    return out


def models_for_benchmark(
    spec: str, *, num_semantic_tokens: Optional[int] = None, semantic_tokens_per_window: Optional[int] = None,
    recovery: Optional[bool] = None, **kwargs: Any,
) -> Tuple[nn.Module, nn.Module, str]:
    """``(base, stvit, source_name)`` for ``spec``: a source name (``deit_small``, a timm ViT, ``swin_small``)
    converted with the token options, or a saved STViT model (directory or ``hf-hub:``, which takes none), and
    its source architecture shaped as it is (:func:`stvit_core.loading.base_model_for`). ``kwargs`` shape a source
    built from a name (``img_size``, ``embed_dim``...).

    Weights do not matter for timing, so models built from names are randomly initialised (nothing is downloaded).
    """
    stvit = load_model(spec, num_semantic_tokens=num_semantic_tokens, semantic_tokens_per_window=semantic_tokens_per_window,
                       recovery=recovery, pretrained=names_a_saved_model(spec), convert=True, **kwargs)
    base = base_model_for(stvit)
    return base, stvit, stvit.stvit_metadata["source_model"]
