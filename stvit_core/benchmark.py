"""Side-by-side throughput of a base model and its STViT version.

Both models are built the same way, put on the same device and dtype, compiled (or not) the same way, and
timed in one process. Warm-up steps are excluded, and the models alternate round by round so that machine
noise (other processes, clock changes) hits both; each model's figure is the median over rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .errors import InvalidArgumentError
from .flops import count_flops, count_params

__all__ = ["BenchmarkSettings", "benchmark_models", "benchmark_pair", "check_settings", "models_for_benchmark"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchmarkSettings:
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    bench: str = "inference"  # 'inference' or 'train' (forward + backward + optimizer step)
    compile: bool = False
    cuda_graphs: bool = False
    channels_last: bool = False
    warmup: int = 2
    rounds: int = 5
    min_round_time: float = 1.0  # seconds of work per model per round; sets the steps per round


def check_settings(settings: BenchmarkSettings) -> None:
    """Raise a one-line error for settings this machine or torch cannot run."""
    if settings.dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {settings.dtype!r} (expected {', '.join(DTYPES)})")
    if settings.bench not in ("inference", "train"):
        raise InvalidArgumentError(f"unknown benchmark {settings.bench!r} (expected inference or train)")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError("--device cuda was asked for but CUDA is not available (see `stvit env`)")
    if settings.cuda_graphs and not settings.device.startswith("cuda"):
        raise InvalidArgumentError("--cuda-graphs needs --device cuda")
    if settings.batch_size < 1:
        raise InvalidArgumentError("batch size must be at least 1")


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


def benchmark_models(
    models: Dict[str, nn.Module],
    input_size: Sequence[int],
    settings: Optional[BenchmarkSettings] = None,
) -> Dict[str, Dict[str, Any]]:
    """Time each model on the same random batch; returns ``{name: {img_per_sec, peak_memory_mb, ...}}``."""
    settings = settings or BenchmarkSettings()
    check_settings(settings)
    device = torch.device(settings.device)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    x = torch.randn((settings.batch_size, *input_size), device=device).contiguous(memory_format=memory_format)
    steps: Dict[str, Callable[[], Any]] = {}
    for name, model in models.items():
        model.to(device=device, memory_format=memory_format)
        steps[name] = _make_step(model, x, settings)

    # Warm up every model (compilation, allocator, cuDNN autotuning) and size the rounds.
    step_time: Dict[str, float] = {}
    peak_memory: Dict[str, Optional[float]] = {}
    for name, step in steps.items():
        for _ in range(max(settings.warmup, 1)):
            step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        step_time[name] = time.perf_counter() - t0
        peak_memory[name] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    iters = {n: max(1, math.ceil(settings.min_round_time / max(t, 1e-6))) for n, t in step_time.items()}

    rates: Dict[str, list] = {name: [] for name in steps}
    for _ in range(settings.rounds):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                step()
            _sync(device)
            rates[name].append(iters[name] * settings.batch_size / (time.perf_counter() - t0))
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
    check_settings(settings)
    input_size = tuple(input_size or stvit.pretrained_cfg.get("input_size", (3, 224, 224)))
    flops = {"base": count_flops(base, input_size), "stvit": count_flops(stvit, input_size)}
    params = {"base": count_params(base), "stvit": count_params(stvit)}
    timings = benchmark_models({"base": base, "stvit": stvit}, input_size, settings)
    out: Dict[str, Any] = {
        "device": _device_name(settings.device),
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


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def models_for_benchmark(
    spec: str, num_semantic_tokens: int = 16, stvit_kwargs: Optional[Dict[str, Any]] = None, **kwargs: Any
) -> "tuple[nn.Module, nn.Module, str]":
    """``(base, stvit, source_name)`` for ``spec``: a source name (``deit_small``, a timm ViT) converted with
    ``num_semantic_tokens``, or a saved STViT model (directory or ``hf-hub:``) with its source architecture.

    Weights do not matter for timing, so source models are randomly initialised (nothing is downloaded).
    ``stvit_kwargs`` go to the conversion (``semantic_tokens_per_window`` for Swin, ``recovery=True``...).
    """
    import timm

    from .checkpoint import is_model_dir, load_model
    from .convert import convert_model, resolve_source_name

    if spec.startswith(("hf-hub:", "local-dir:")) or is_model_dir(spec):
        stvit = load_model(spec)
        source_name = _source_from_config(spec)
        base = timm.create_model(
            source_name.split(".")[0], pretrained=False, num_classes=stvit.num_classes,
            img_size=tuple(stvit.pretrained_cfg["input_size"][1:]),
        )
        return base, stvit, source_name
    source_name = resolve_source_name(spec)
    base = timm.create_model(source_name.split(".")[0], pretrained=False, **kwargs)
    stvit = convert_model(base, num_semantic_tokens=num_semantic_tokens, **(stvit_kwargs or {}))
    return base, stvit, source_name


def _source_from_config(spec: str) -> str:
    import json

    from .checkpoint import CONFIG_NAME, read_config
    from .errors import CheckpointError

    if spec.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = spec[len("hf-hub:"):].partition("@")
        with open(hf_hub_download(repo, CONFIG_NAME, revision=revision or None)) as f:
            cfg = json.load(f)
    else:
        cfg = read_config(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec)
    source = (cfg.get("stvit") or {}).get("source_model")
    if not source:
        raise CheckpointError(f"{spec} does not record its source model (config.json 'stvit.source_model')")
    return source
