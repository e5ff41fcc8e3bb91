"""``stvit demo``: the main job end to end on the embedded data, offline."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import echo_json


@click.command()
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Where the converted, fine-tuned and exported models go.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs.")
@click.option("--tokens", "num_semantic_tokens", type=int, default=16, show_default=True)
@click.option("--force", is_flag=True, help="Reuse a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def demo(output: Path, epochs: int, num_semantic_tokens: int, force: bool, as_json: bool) -> None:
    """Convert -> fine-tune -> evaluate -> benchmark on the embedded Fashion-MNIST subset.

    No network and no data of yours: a DeiT-Tiny layout (width 64, 32 px images) is converted to STViT,
    fine-tuned on 2000 images, evaluated on 500, and timed against its source. A few minutes on 2 CPU cores.

    \b
    Examples:
      stvit demo
      stvit demo --epochs 10 --output /tmp/demo --force --json
    """
    from stvit_core.demo import run_demo

    log = None if as_json else click.echo
    result = run_demo(output, epochs=epochs, num_semantic_tokens=num_semantic_tokens, force=force, log=log)
    if as_json:
        echo_json(result)
        return
    click.echo(
        f"\nSTViT ({result['tokens']} semantic tokens): top-1 {result['top1']:.1f}% on Fashion-MNIST after "
        f"{result['epochs']} epochs, {result['speedup']:.2f}x the source's CPU throughput "
        f"({result['base_gflops']:.3f} -> {result['gflops']:.3f} GFLOPs); "
        f"DeiT-S at 224 px: {result['deit_small_speedup']:.2f}x.\n"
        f"Model: {result['model']}  (stvit eval folder -m {result['model']} -d fashion-mnist)"
    )
