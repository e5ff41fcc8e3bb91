"""Side-by-side throughput of a base model and its STViT version.

Both models are built the same way, put on the same device and dtype, compiled (or not) the same way, and
timed in one process with ``torch.utils.benchmark.Timer`` (CUDA synchronised, warm-up excluded, the thread
count of the process). The models alternate round by round so that machine noise (other processes, clock
changes) hits both; each model's figure is the median over rounds.
"""

from __future__ import annotations

import math
import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .device import resolve_device
from .errors import DownloadError, InvalidArgumentError
from .flops import count_flops, count_params

__all__ = ["BenchmarkSettings", "benchmark_models", "benchmark_pair", "check_settings", "models_for_benchmark"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def check_settings(settings: BenchmarkSettings) -> torch.device:
    """Raise a one-line error for settings this machine or torch cannot run; returns the device."""
    if settings.dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {settings.dtype!r} (expected {', '.join(DTYPES)})")
    if settings.bench not in ("inference", "train"):
        raise InvalidArgumentError(f"unknown benchmark {settings.bench!r} (expected inference or train)")
    for name, value, low in (("batch_size", settings.batch_size, 1), ("rounds", settings.rounds, 1),
                             ("warmup", settings.warmup, 0)):
        if value < low:
            raise InvalidArgumentError(f"{name} must be at least {low}, got {value}")
    if not settings.min_round_time > 0:
        raise InvalidArgumentError(f"min_round_time must be positive, got {settings.min_round_time}")
    device = resolve_device(settings.device)
    if settings.cuda_graphs and device.type != "cuda":
        raise InvalidArgumentError("cuda_graphs=True needs a CUDA device")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(model: nn.Module, x: torch.Tensor, settings: BenchmarkSettings) -> Callable[[], Any]:
    device = x.device
    dtype = DTYPES[settings.dtype]
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    )
    runner: nn.Module = model
    if settings.compile or settings.cuda_graphs:
        mode = "reduce-overhead" if settings.cuda_graphs else None
        runner = torch.compile(model, mode=mode)
    if settings.bench == "inference":
        model.eval()

        def step() -> Any:
            with torch.inference_mode(), autocast:
                return runner(x)

        return step

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    num_classes = getattr(model, "num_classes", 1000) or 1000
    target = torch.randint(0, num_classes, (x.shape[0],), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> Any:
        with autocast:
            loss = loss_fn(runner(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return train_step


def _timer(step: Callable[[], Any]) -> Any:
    from torch.utils.benchmark import Timer

    # Timer would time on one thread by default; measure with the threads the process runs with
    return Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())


def benchmark_models(
    models: Dict[str, nn.Module],
    input_size: Sequence[int],
    settings: Optional[BenchmarkSettings] = None,
) -> Dict[str, Dict[str, Any]]:
    """Time each model on the same random batch; returns ``{name: {img_per_sec, peak_memory_mb, ...}}``."""
    settings = settings or BenchmarkSettings()
    device = check_settings(settings)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    x = torch.randn((settings.batch_size, *input_size), device=device).contiguous(memory_format=memory_format)
    timers, step_time, peak_memory = {}, {}, {}
    for name, model in models.items():
        model.to(device=device, memory_format=memory_format)
        step = _make_step(model, x, settings)
        for _ in range(settings.warmup):  # compilation, allocator, cuDNN autotuning
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timers[name] = _timer(step)
        step_time[name] = timers[name].timeit(1).mean  # sizes the rounds
        peak_memory[name] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    iters = {n: max(1, math.ceil(settings.min_round_time / max(t, 1e-6))) for n, t in step_time.items()}

    rates: Dict[str, List[float]] = {name: [] for name in timers}
    for _ in range(settings.rounds):
        for name, timer in timers.items():
            rates[name].append(settings.batch_size / timer.timeit(iters[name]).mean)
    return {
        name: {
            "img_per_sec": statistics.median(r),
            "img_per_sec_rounds": r,
            "peak_memory_mb": peak_memory[name],
            "steps_per_round": iters[name],
        }
        for name, r in rates.items()
    }


def benchmark_pair(
    base: nn.Module,
    stvit: nn.Module,
    settings: Optional[BenchmarkSettings] = None,
    input_size: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """Benchmark ``base`` against ``stvit``; the result has the ``stvit benchmark --json`` schema."""
    settings = settings or BenchmarkSettings()
    device = check_settings(settings)
    input_size = tuple(input_size or stvit.pretrained_cfg.get("input_size", (3, 224, 224)))
    flops = {"base": count_flops(base, input_size), "stvit": count_flops(stvit, input_size)}
    params = {"base": count_params(base), "stvit": count_params(stvit)}
    timings = benchmark_models({"base": base, "stvit": stvit}, input_size, settings)
    out: Dict[str, Any] = {
        "device": _device_name(device),
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "bench": settings.bench,
        "compile": settings.compile,
        "cuda_graphs": settings.cuda_graphs,
        "channels_last": settings.channels_last,
        "input_size": list(input_size),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for name in ("base", "stvit"):
        out[name] = {
            "params_m": round(params[name] / 1e6, 3),
            "gflops": round(flops[name], 4),
            "img_per_sec": round(timings[name]["img_per_sec"], 2),
            "peak_memory_mb": None
            if timings[name]["peak_memory_mb"] is None
            else round(timings[name]["peak_memory_mb"], 1),
        }
    out["speedup"] = round(out["stvit"]["img_per_sec"] / out["base"]["img_per_sec"], 3)
    out["flops_ratio"] = round(flops["base"] / flops["stvit"], 3)
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def models_for_benchmark(
    spec: str, num_semantic_tokens: Optional[int] = None, stvit_kwargs: Optional[Dict[str, Any]] = None,
    **kwargs: Any,
) -> Tuple[nn.Module, nn.Module, str]:
    """``(base, stvit, source_name)`` for ``spec``: a source name (``deit_small``, a timm ViT, ``swin_small``)
    converted with ``num_semantic_tokens`` (``stvit_kwargs``: ``semantic_tokens_per_window`` for Swin,
    ``recovery=True``...), or a saved STViT model (directory or ``hf-hub:``) with its source architecture,
    which takes no conversion arguments.

    Weights do not matter for timing, so source models are randomly initialised (nothing is downloaded).
    """
    import timm

    from .checkpoint import is_model_dir, load_model
    from .convert import convert_model, resolve_source_name

    stvit_kwargs = dict(stvit_kwargs or {})
    if spec.startswith(("hf-hub:", "local-dir:")) or is_model_dir(spec):
        given = sorted(k for k, v in dict(stvit_kwargs, num_semantic_tokens=num_semantic_tokens).items()
                       if v not in (None, False))
        if given:
            raise InvalidArgumentError(f"{', '.join(given)} cannot apply to a saved model ({spec}): it is timed "
                                       "as it was converted")
        stvit = load_model(spec)
        source_name = _source_from_config(spec)
        base = timm.create_model(
            source_name.split(".")[0], pretrained=False, num_classes=stvit.num_classes,
            img_size=tuple(stvit.pretrained_cfg["input_size"][1:]),
        )
        return base, stvit, source_name
    source_name = resolve_source_name(spec)
    base = timm.create_model(source_name.split(".")[0], pretrained=False, **kwargs)
    stvit = convert_model(base, num_semantic_tokens=num_semantic_tokens, **stvit_kwargs)
    return base, stvit, source_name


def _source_from_config(spec: str) -> str:
    import json

    from .checkpoint import CONFIG_NAME, read_config
    from .errors import CheckpointError, first_line

    if spec.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = spec[len("hf-hub:"):].partition("@")
        try:  # load_model has just fetched it: this is a cache hit
            with open(hf_hub_download(repo, CONFIG_NAME, revision=revision or None)) as f:
                cfg = json.load(f)
        except Exception as e:
            raise DownloadError(f"cannot read the config of {spec}: {first_line(e)}") from None
    else:
        cfg = read_config(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec)
    source = (cfg.get("stvit") or {}).get("source_model")
    if not source:
        raise CheckpointError(f"{spec} does not record its source model (config.json 'stvit.source_model')")
    return source
