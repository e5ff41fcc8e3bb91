"""``stvit demo``: the main job end to end on the embedded data, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ._checks import EarlyError, exists_message
from ._common import echo_json, json_option, positive_int, tokens_option


@click.command()
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, metavar="DIR",
              help="Where the converted, fine-tuned and exported models and summary.json go.")
@click.option("--epochs", type=positive_int(), default=10, show_default=True, metavar="N", help="Fine-tuning epochs.")
@tokens_option(default_help="16")
@click.option("--force", is_flag=True, help="Reuse a non-empty output directory.")
@json_option
def demo(output: Path, epochs: int, num_semantic_tokens: Optional[int], force: bool, as_json: bool) -> None:
    """Convert -> fine-tune -> evaluate -> benchmark on the embedded Fashion-MNIST subset.

    No network and no data of yours: a DeiT-Tiny layout (width 64, 32 px images) is converted to STViT,
    fine-tuned on 2000 images, evaluated on 500, and timed against its source on the CPU. A few minutes
    on 2 CPU cores. The figures printed at the end are also written to OUTPUT/summary.json.

    \b
    Examples:
      stvit demo
      stvit demo --epochs 10 --output /tmp/demo --force --json
    """
    # before stvit_core (torch) is imported: an output in use fails at once (as stvit_core.demo says it)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise EarlyError(exists_message(output))

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
        f"Model: {result['model']}  (stvit eval folder -m {result['model']} -d fashion-mnist)\n"
        f"Summary: {Path(result['output']) / 'summary.json'}"
    )
