"""``stvit benchmark``: base model vs STViT, timed side by side in one process."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import click

from ._common import (
    device_option,
    echo_json,
    json_option,
    positive_float,
    positive_int,
    source_model_options,
)


@click.command()
@source_model_options
@click.option("--batch-size", "-b", type=positive_int(), default=32, show_default=True, metavar="N",
              help="Images per step, the same for both models.")
@device_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Autocast dtype (float32 = no autocast).")
@click.option("--bench", type=click.Choice(["inference", "train", "both"]), default="inference", show_default=True,
              help="train = forward + backward + AdamW step.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile both models.")
@click.option("--cuda-graphs", is_flag=True, help="torch.compile(mode='reduce-overhead') (CUDA graphs); needs CUDA.")
@click.option("--channels-last", is_flag=True, help="Channels-last input and weights (conv stems).")
@click.option("--rounds", type=positive_int(), default=5, show_default=True, metavar="N",
              help="Alternating timing rounds (the median is reported).")
@click.option("--round-time", type=positive_float(), default=1.0, show_default=True, metavar="SECONDS",
              help="Seconds of work per model per round.")
@click.option("--threads", type=positive_int(), default=None, show_default="torch's choice", metavar="N",
              help="CPU threads for torch.")
@json_option
def benchmark(model: str, num_semantic_tokens: Optional[int], semantic_tokens_per_window: Optional[int],
              recovery: bool, batch_size: int, device: Optional[str], dtype: str, bench: str, compile_: bool,
              cuda_graphs: bool, channels_last: bool, rounds: int, round_time: float, threads: Optional[int],
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
    """
    import torch

    from stvit_core.benchmark import BenchmarkSettings, benchmark_pair, check_settings, models_for_benchmark

    if threads is not None:
        torch.set_num_threads(threads)
    runs = [
        BenchmarkSettings(
            batch_size=batch_size, device=device, dtype=dtype, bench=kind, compile=compile_,
            cuda_graphs=cuda_graphs, channels_last=channels_last, rounds=rounds, min_round_time=round_time,
        )
        for kind in (["inference", "train"] if bench == "both" else [bench])
    ]
    for settings in runs:
        check_settings(settings)  # before building models: bad input fails at once
    stvit_kwargs = {"semantic_tokens_per_window": semantic_tokens_per_window, "recovery": recovery or None}
    base, stvit, source_name = models_for_benchmark(
        model, num_semantic_tokens, stvit_kwargs={k: v for k, v in stvit_kwargs.items() if v is not None})
    results = []
    for settings in runs:
        result = benchmark_pair(base, stvit, settings)
        results.append({"model": source_name, "stvit_model": stvit.pretrained_cfg.get("architecture"),
                        "tokens": getattr(stvit, "num_semantic_tokens", None),
                        "tokens_per_window": getattr(stvit, "semantic_tokens_per_window", None), **result})
    if as_json:
        echo_json(results[0] if len(results) == 1 else results)
        return
    for r in results:
        click.echo(format_table(r))


def format_table(r: Dict[str, Any]) -> str:
    """The human-readable result: a settings line, one row per model (columns fit the longest name), speedup."""
    mem = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    tok = f"{r['tokens_per_window']} tok/window" if r.get("tokens_per_window") else f"{r['tokens']} tok"
    rows = [(r["model"], r["base"]), (f"{r['stvit_model']} ({tok})", r["stvit"])]
    width = max(len("model"), *(len(name) for name, _ in rows))
    lines: List[str] = [
        f"{r['bench']} | {r['device']} | {r['dtype']} | batch {r['batch_size']}"
        f"{' | compiled' if r['compile'] else ''}{' | cuda graphs' if r['cuda_graphs'] else ''}"
        f" | torch {r['torch']} | {r['threads']} threads",
        f"{'model':<{width}} {'params(M)':>10} {'GFLOPs':>8} {'img/s':>10} {'peak MB':>8}",
    ]
    for name, m in rows:
        lines.append(f"{name:<{width}} {m['params_m']:>10.2f} {m['gflops']:>8.2f} {m['img_per_sec']:>10.1f} "
                     f"{mem(m['peak_memory_mb']):>8}")
    lines.append(f"speedup {r['speedup']:.2f}x   (FLOPs ratio {r['flops_ratio']:.2f}x)")
    return "\n".join(lines)
