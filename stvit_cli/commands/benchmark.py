"""``stvit benchmark``: base model vs STViT, timed side by side in one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from ._checks import check_output_file, exclusive, invalid
from ._common import (
    LibraryOption,
    device_option,
    echo_json,
    json_option,
    positive_float,
    positive_int,
    source_model_options,
)


class BatchSizes(click.ParamType):
    """``1,8,32``: positive batch sizes, in the order given."""

    name = "batch_sizes"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            sizes = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of batch sizes (e.g. 1,8,32)", param, ctx)
        if not sizes or min(sizes) < 1:
            self.fail(f"{value!r}: batch sizes must be at least 1 (e.g. 1,8,32)", param, ctx)
        if len(set(sizes)) != len(sizes):
            self.fail(f"{value!r} repeats a batch size", param, ctx)
        return sizes


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class ThreadCount(click.IntRange):
    """A thread count from 1 to the CPUs this process may use: more threads than CPUs only time contention (and
    a huge count ends in the OpenMP runtime's own out-of-memory abort, not an error line)."""

    def __init__(self) -> None:
        super().__init__(min=1)

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        threads = super().convert(value, param, ctx)
        cpus = usable_cpus()
        if threads > cpus:
            self.fail(f"{threads} is more than the {cpus} CPUs this process can use", param, ctx)
        return threads


@click.command()
@source_model_options
@click.option("--batch-size", "-b", type=positive_int(), default=32, show_default=True, metavar="N",
              help="Images per step, the same for both models.")
@device_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Autocast dtype (float32 = no autocast).")
@click.option("--bench", type=click.Choice(["inference", "train", "both"]), default="inference", show_default=True,
              help="train = forward + backward + AdamW step.")
@click.option("--compile", "compile_", is_flag=True, cls=LibraryOption, library_name="compile",
              help="torch.compile both models.")
@click.option("--cuda-graphs", is_flag=True, help="torch.compile(mode='reduce-overhead') (CUDA graphs); needs CUDA.")
@click.option("--channels-last", is_flag=True, help="Channels-last input and weights (conv stems).")
@click.option("--patch-gemm", is_flag=True,
              help="Both models' patch embeddings as a patch gather + one GEMM (faster than cuDNN's bf16 kernel on "
                   "CUDA; the convolution elsewhere).")
@click.option("--reparam", is_flag=True,
              help="Both models reparameterised for inference first (timm's reparameterize_model: the conv stem's "
                   "BatchNorm folded into its convolutions). Inference only.")
@click.option("--rounds", type=positive_int(), default=5, show_default=True, metavar="N",
              help="Alternating timing rounds (the median is reported).")
@click.option("--round-time", type=positive_float(), default=1.0, show_default=True, metavar="SECONDS",
              help="Seconds of work per model per round.")
@click.option("--threads", type=ThreadCount(), default=None, show_default="torch's choice", metavar="N",
              help="CPU threads for torch (and onnxruntime with --runtime onnxruntime), at most the CPUs this "
                   "process can use.")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="onnxruntime: both models exported to ONNX (dynamic batch) and run by onnxruntime (CPU; CUDA with "
                   "--device cuda and onnxruntime-gpu); float32 inference only.")
@click.option("--batch-sizes", type=BatchSizes(), default=None, show_default="off", metavar="B1,B2,...",
              help="Time each batch size, every step on its own: throughput and p50/p95 latency of a batch "
                   "(replaces --batch-size).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="With --batch-sizes: a PNG (FILE ends in .png) of throughput and latency against batch size "
                   "(needs matplotlib: pip install 'stvit[plot]'); must not exist unless --force.")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@json_option
def benchmark(model: str, num_semantic_tokens: Optional[int], semantic_tokens_per_window: Optional[int],
              recovery: bool, batch_size: int, device: Optional[str], dtype: str, bench: str, compile_: bool,
              cuda_graphs: bool, channels_last: bool, patch_gemm: bool, reparam: bool, rounds: int, round_time: float, threads: Optional[int],
              runtime: str, batch_sizes: Optional[Tuple[int, ...]], plot: Optional[Path], force: bool,
              as_json: bool) -> None:
    """Time MODEL's base version and its STViT version with identical settings.

    MODEL is a source name (deit_tiny | deit_small | deit_base | swin_tiny | swin_small | swin_base | a timm
    DeiT/ViT/Swin name), converted on the fly with --tokens (--tokens-per-window for Swin), or a saved STViT
    model (directory or hf-hub:org/name) compared with its source architecture. Weights are random (timing
    does not depend on them); nothing is downloaded for source names. Warm-up is excluded and the models
    alternate, so noise hits both.

    \b
    Examples:
      stvit benchmark deit_small --tokens 16 --device cpu
      stvit benchmark deit_small --device cuda --dtype bfloat16 --batch-size 256 --compile
      stvit benchmark deit_base --bench train --device cuda --dtype bfloat16 --json
      stvit benchmark ./stvit-deit_small-t16 --json
      stvit benchmark swin_small --tokens-per-window 9 --device cuda --dtype bfloat16 --batch-size 256
      stvit benchmark deit_small --device cpu --runtime onnxruntime
      stvit benchmark deit_small --device cpu --batch-sizes 1,8,32 --plot latency.png
    """
    # plain arguments first, before stvit_core (torch) is imported: a wrong option or path fails at once
    batch_size_given = click.get_current_context().get_parameter_source("batch_size").name != "DEFAULT"
    exclusive(batch_size=bool(batch_sizes) and batch_size_given, batch_sizes=bool(batch_sizes))
    if plot is not None:
        if not batch_sizes:
            raise invalid("--plot needs --batch-sizes (it draws speed against batch size)")
        if bench == "both":
            raise invalid("--plot draws one benchmark: give it --bench inference or --bench train")
        if plot.suffix.lower() != ".png":
            raise invalid(f"--plot writes a PNG: FILE must end in .png, got {plot.name}")
        check_output_file(plot, force=force)
    elif force:
        raise invalid("--force applies to --plot only (the file it replaces)")

    import torch

    from stvit_core.benchmark import (
        BenchmarkSettings,
        benchmark_batch_sizes,
        check_settings,
        model_label,
        models_for_benchmark,
    )

    if plot is not None:
        from stvit_core.errors import require_extra
        from stvit_core.files import check_output_path

        require_extra("plot", ("matplotlib",), "--plot")
        check_output_path(plot, force=force)  # an unwritable folder fails now, not after the timing
    if threads is not None:
        torch.set_num_threads(threads)
    runs = [
        BenchmarkSettings(
            batch_size=batch_size, device=device, dtype=dtype, bench=kind, compile=compile_,
            cuda_graphs=cuda_graphs, channels_last=channels_last, patch_gemm=patch_gemm, reparam=reparam, rounds=rounds, min_round_time=round_time,
            runtime=runtime, latency=bool(batch_sizes),
        )
        for kind in (["inference", "train"] if bench == "both" else [bench])
    ]
    for settings in runs:
        check_settings(settings)  # before building models: bad input fails at once
    base, stvit, source_name = models_for_benchmark(
        model, num_semantic_tokens=num_semantic_tokens, semantic_tokens_per_window=semantic_tokens_per_window,
        recovery=recovery)
    # the models as they are (architecture, tokens, shape), not by the pretrained source a model came from
    names = {"model": source_name, "stvit_model": stvit.pretrained_cfg.get("architecture"),
             "tokens": getattr(stvit, "num_semantic_tokens", None),
             "tokens_per_window": getattr(stvit, "semantic_tokens_per_window", None),
             "labels": {"base": model_label(base), "stvit": model_label(stvit)}}
    results = [{**names, **result} for settings in runs
               for result in benchmark_batch_sizes(base, stvit, batch_sizes or [batch_size], settings)]
    for r in results:
        for warning in r["warnings"]:
            where = f"{r['bench']}, batch {r['batch_size']}: " if len(results) > 1 else ""
            click.echo(f"Warning: {where}{warning}", err=True)
    if plot is not None:
        from stvit_core.benchmark import plot_batch_sizes

        plot_batch_sizes([r for r in results if r["bench"] == runs[0].bench], plot,
                         labels=(names["labels"]["base"], names["labels"]["stvit"]))
    if as_json:
        echo_json(results[0] if len(results) == 1 and not batch_sizes else results)
    elif batch_sizes:
        for settings in runs:
            click.echo(format_batch_table([r for r in results if r["bench"] == settings.bench]))
    else:
        for r in results:
            click.echo(format_table(r))
    if plot is not None and not as_json:
        click.echo(f"plot written to {plot}")


def _labels(r: Dict[str, Any]) -> Tuple[str, str]:
    """The two models' names as :func:`stvit_core.benchmark.model_label` gives them (architecture, tokens, shape)."""
    if r.get("labels"):
        return r["labels"]["base"], r["labels"]["stvit"]
    tok = f"{r['tokens_per_window']} tokens per window" if r.get("tokens_per_window") else f"{r['tokens']} tokens"
    return r["model"].split(".")[0], f"{r['stvit_model']} ({tok})"


def _rounds(r: Dict[str, Any]) -> str:
    """The per-round speedups' range: ``1.85-2.01x``."""
    spread = r.get("speedup_spread")
    return f"{spread['min']:.2f}-{spread['max']:.2f}x" if spread else "n/a"


def format_table(r: Dict[str, Any]) -> str:
    """The human-readable result: a settings line, one row per model (columns fit the longest name), speedup
    with the range of its rounds."""
    mem = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    base_label, stvit_label = _labels(r)
    rows = [(base_label, r["base"]), (stvit_label, r["stvit"])]
    width = max(len("model"), *(len(name) for name, _ in rows))
    lines: List[str] = [
        f"{_settings_line(r)} | batch {r['batch_size']}",
        f"{'model':<{width}} {'params(M)':>10} {'GFLOPs':>8} {'img/s':>10} {'peak MB':>8}",
    ]
    for name, m in rows:
        lines.append(f"{name:<{width}} {m['params_m']:>10.2f} {m['gflops']:>8.2f} {m['img_per_sec']:>10.1f} "
                     f"{mem(m['peak_memory_mb']):>8}")
    spread = r.get("speedup_spread")
    quartiles = f", middle half {spread['q1']:.2f}-{spread['q3']:.2f}x" if spread else ""
    lines.append(f"speedup {r['speedup']:.2f}x (median of {len(r.get('speedup_rounds', [])) or 'the'} rounds: "
                 f"{_rounds(r)}{quartiles})   (FLOPs ratio {r['flops_ratio']:.2f}x)")
    return "\n".join(lines)


def _settings_line(r: Dict[str, Any]) -> str:
    runtime = f"onnxruntime {r['onnxruntime']}" if r.get("runtime") == "onnxruntime" else f"torch {r['torch']}"
    return (f"{r['bench']} | {r['device']} | {r['dtype']}"
            f"{' | compiled' if r['compile'] else ''}{' | cuda graphs' if r['cuda_graphs'] else ''}"
            f" | {runtime} | {r['threads']} threads"
            f"{' | ' + r['memory_allocator'] + ' malloc' if r['device'] == 'cpu' and r.get('memory_allocator') else ''}")


def format_batch_table(results: List[Dict[str, Any]]) -> str:
    """``--batch-sizes``: one row per batch size, throughput and p50/p95 latency of both models, and the two
    speedups, each named: of throughput (images/s, with the range of its rounds) and of p50 latency."""
    base_label, stvit_label = _labels(results[0])
    lines = [_settings_line(results[0]), f"base: {base_label}   STViT: {stvit_label}",
             f"{'batch':>5} | {'base img/s':>10} {'p50 ms':>9} {'p95 ms':>9} | {'STViT img/s':>11} {'p50 ms':>9} "
             f"{'p95 ms':>9} | {'throughput speedup':>18} {'rounds':>12} | {'p50 latency speedup':>19}"]
    for r in results:
        b, s = r["base"], r["stvit"]
        lines.append(f"{r['batch_size']:>5} | {b['img_per_sec']:>10.1f} {b['latency_ms']['p50']:>9.1f} "
                     f"{b['latency_ms']['p95']:>9.1f} | {s['img_per_sec']:>11.1f} {s['latency_ms']['p50']:>9.1f} "
                     f"{s['latency_ms']['p95']:>9.1f} | {r['speedup']:>17.2f}x {_rounds(r):>12} | "
                     f"{r['latency_speedup_p50']:>18.2f}x")
    return "\n".join(lines)
