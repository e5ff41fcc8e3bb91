"""``stvit benchmark``: base model vs STViT, timed side by side in one process."""

from __future__ import annotations

from typing import Optional

import click

from ._common import echo_json


@click.command()
@click.argument("model")
@click.option("--tokens", "num_semantic_tokens", type=int, default=16, show_default=True,
              help="Semantic tokens when MODEL is a source name (ignored for saved models).")
@click.option("--tokens-per-window", "tokens_per_window", type=int, default=None,
              help="Swin sources: semantic tokens per window (4, 9 or 16) [default: 9].")
@click.option("--recovery", is_flag=True, help="DeiT/ViT sources: time STViT-R (dumbbell units) instead.")
@click.option("--batch-size", "-b", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Autocast dtype (float32 = no autocast).")
@click.option("--bench", type=click.Choice(["inference", "train", "both"]), default="inference", show_default=True,
              help="train = forward + backward + AdamW step.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile both models.")
@click.option("--cuda-graphs", is_flag=True, help="torch.compile(mode='reduce-overhead') (CUDA graphs).")
@click.option("--channels-last", is_flag=True, help="Channels-last input and weights (conv stems).")
@click.option("--rounds", type=int, default=5, show_default=True, help="Alternating timing rounds (median taken).")
@click.option("--round-time", type=float, default=1.0, show_default=True, help="Seconds of work per model per round.")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def benchmark(
    model: str,
    num_semantic_tokens: int,
    tokens_per_window: Optional[int],
    recovery: bool,
    batch_size: int,
    device: str,
    dtype: str,
    bench: str,
    compile_: bool,
    cuda_graphs: bool,
    channels_last: bool,
    rounds: int,
    round_time: float,
    threads: Optional[int],
    as_json: bool,
) -> None:
    """Time MODEL's base version and its STViT version with identical settings.

    MODEL is a source name (deit_tiny | deit_small | deit_base | swin_tiny | swin_small | swin_base | a timm
    DeiT/ViT/Swin name), converted on the fly with --tokens (--tokens-per-window for Swin), or a saved STViT model (directory or hf-hub:org/name) compared with its source
    architecture. Weights are random (timing does not depend on them); nothing is downloaded for source
    names. Warm-up is excluded and the models alternate, so noise hits both.

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

    if threads:
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
    stvit_kwargs: dict = {}
    if tokens_per_window is not None:
        stvit_kwargs["semantic_tokens_per_window"] = tokens_per_window
    if recovery:
        stvit_kwargs["recovery"] = True
    base, stvit, source_name = models_for_benchmark(model, num_semantic_tokens, stvit_kwargs=stvit_kwargs)
    results = []
    for settings in runs:
        result = benchmark_pair(base, stvit, settings)
        result = {"model": source_name, "stvit_model": stvit.pretrained_cfg.get("architecture"),
                  "tokens": getattr(stvit, "num_semantic_tokens", None),
                  "tokens_per_window": getattr(stvit, "semantic_tokens_per_window", None), **result}
        results.append(result)
    if as_json:
        echo_json(results[0] if len(results) == 1 else results)
        return
    for r in results:
        _print_table(r)


def _print_table(r: dict) -> None:
    mem = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    click.echo(
        f"{r['bench']} | {r['device']} | {r['dtype']} | batch {r['batch_size']}"
        f"{' | compiled' if r['compile'] else ''}{' | cuda graphs' if r['cuda_graphs'] else ''}"
        f" | torch {r['torch']} | {r['threads']} threads"
    )
    click.echo(f"{'model':<34} {'params(M)':>10} {'GFLOPs':>8} {'img/s':>10} {'peak MB':>8}")
    tok = f"{r['tokens_per_window']} tok/window" if r.get("tokens_per_window") else f"{r['tokens']} tok"
    for key, name in (("base", r["model"]), ("stvit", f"{r['stvit_model']} ({tok})")):
        m = r[key]
        click.echo(f"{name:<34} {m['params_m']:>10.2f} {m['gflops']:>8.2f} {m['img_per_sec']:>10.1f} "
                   f"{mem(m['peak_memory_mb']):>8}")
    click.echo(f"speedup {r['speedup']:.2f}x   (FLOPs ratio {r['flops_ratio']:.2f}x)")
