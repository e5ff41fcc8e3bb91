"""``stvit convert``: a pretrained DeiT/ViT/Swin (or the official STViT-R release) -> an STViT model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ._common import echo_json


@click.command()
@click.argument("model")
@click.option("--tokens", "num_semantic_tokens", type=int, default=16, show_default=True,
              help="Semantic tokens (a perfect square: 16, 36, 64, 100...). DeiT/ViT.")
@click.option("--tokens-per-window", "tokens_per_window", type=int, default=None,
              help="Swin: semantic tokens per 7x7 window (4, 9 or 16) [default: 9, as released].")
@click.option("--recovery", is_flag=True,
              help="DeiT/ViT: STViT-R (dumbbell units that keep the 14x14 map, for dense tasks).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: ./stvit-MODEL-tTOKENS].")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local source weights (.pth/.pt/.bin/.safetensors) instead of downloading.")
@click.option("--no-pretrained", is_flag=True, help="Random source weights (nothing downloaded).")
@click.option("--image-blocks", "num_image_blocks", type=int, default=None,
              help="Ordinary blocks before the semantic token generator (STViT-DeiT) [default: 4].")
@click.option("--pool", "semantic_token_pool", type=click.Choice(["max", "avg"]), default="max", show_default=True,
              help="Pooling that initialises the semantic tokens.")
@click.option("--global-tokens/--no-global-tokens", default=None,
              help="Learned global semantic tokens in the generator's second layer "
                   "[default: on for DeiT/ViT, off for Swin as released].")
@click.option("--readout", type=click.Choice(["token", "avg"]), default=None,
              help="Classifier input: class token (default for DeiT) or average of semantic tokens.")
@click.option("--num-classes", type=int, default=None, help="Replace the classifier with one of this size.")
@click.option("--img-size", type=int, default=None, help="Input resolution (position embeddings are resampled).")
@click.option("--force", is_flag=True, help="Overwrite the output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def convert(
    model: str,
    num_semantic_tokens: int,
    tokens_per_window: Optional[int],
    recovery: bool,
    output: Optional[Path],
    checkpoint: Optional[Path],
    no_pretrained: bool,
    num_image_blocks: Optional[int],
    semantic_token_pool: str,
    global_tokens: Optional[bool],
    readout: Optional[str],
    num_classes: Optional[int],
    img_size: Optional[int],
    force: bool,
    as_json: bool,
) -> None:
    """Convert a pretrained DeiT/ViT/Swin to an STViT model directory.

    MODEL: deit_tiny | deit_small | deit_base | swin_tiny | swin_small | swin_base | a timm DeiT/ViT/Swin name.
    DeiT/ViT become STViT (or STViT-R with --recovery); Swin becomes STViT-R-Swin (stage 3 in dumbbell
    units, --tokens-per-window). Weights come from timm's pretrained checkpoint (Hugging Face Hub download),
    or --checkpoint FILE, or random with --no-pretrained. A --checkpoint from the official STViT-R release
    (STViT-R-Swin-S.pth / STViT-R-Swin-B.pth) is recognised and gives the released model. Writes
    config.json + model.safetensors to the output directory; load it with stvit_core.load_model(DIR) or
    timm.create_model('local-dir:DIR', pretrained=True).

    \b
    Examples:
      stvit convert deit_small --tokens 16
      stvit convert deit_base --tokens 36 --checkpoint deit_base.pth --output stvit-deit-b-36
      stvit convert deit_tiny --no-pretrained --output /tmp/t --json
      stvit convert deit_small --recovery --output stvit-r-deit-s
      stvit convert swin_small --tokens-per-window 9 --output stvit-r-swin-s
      stvit convert swin_small --checkpoint STViT-R-Swin-S.pth --output stvit-r-swin-s-release
    """
    from stvit_core.checkpoint import save_model
    from stvit_core.convert import conversion_metadata, convert_pair, resolve_source_name
    from stvit_core.errors import InvalidArgumentError, OutputExistsError

    if checkpoint is not None and no_pretrained:
        raise InvalidArgumentError("--checkpoint and --no-pretrained exclude each other")
    source_name = resolve_source_name(model)
    is_swin = source_name.startswith("swin")
    if is_swin and recovery:
        raise InvalidArgumentError("--recovery is for DeiT/ViT; Swin always converts to STViT-R")
    if not is_swin and tokens_per_window is not None:
        raise InvalidArgumentError("--tokens-per-window is for Swin; use --tokens for DeiT/ViT")
    tokens_tag = f"w{tokens_per_window or 9}" if is_swin else f"t{num_semantic_tokens}"
    prefix = "stvit-r" if is_swin or recovery else "stvit"
    output = output or Path(f"{prefix}-{model.replace('/', '_')}-{tokens_tag}")
    if output.exists() and not force:  # fail before any download or conversion
        raise OutputExistsError(f"{output} already exists (use --force to overwrite)")

    source_kwargs = {}
    if num_classes is not None:
        source_kwargs["num_classes"] = num_classes
    if img_size is not None:
        source_kwargs["img_size"] = img_size
    stvit_kwargs: dict = dict(semantic_token_pool=semantic_token_pool)
    if num_image_blocks is not None:
        stvit_kwargs["num_image_blocks"] = num_image_blocks
    if global_tokens is not None:
        stvit_kwargs["global_semantic_tokens"] = global_tokens
    if readout is not None:
        stvit_kwargs["global_pool"] = readout
    if is_swin:
        stvit_kwargs["semantic_tokens_per_window"] = tokens_per_window
    elif recovery:
        stvit_kwargs["recovery"] = True
    source, stvit = convert_pair(
        source_name, num_semantic_tokens=num_semantic_tokens, pretrained=not no_pretrained,
        checkpoint=checkpoint, source_kwargs=source_kwargs, **stvit_kwargs,
    )
    metadata = conversion_metadata(source, stvit, source_name=source_name)
    metadata["source_weights"] = (
        str(checkpoint) if checkpoint else ("random" if no_pretrained else f"timm/{source_name}")
    )
    save_model(stvit, output, force=force, metadata=metadata)

    summary = {
        "model": metadata["architecture"],
        "source_model": source_name,
        "tokens": metadata["num_semantic_tokens"],
        "tokens_per_window": metadata["semantic_tokens_per_window"],
        "params_m": metadata["params_m"],
        "base_params_m": metadata["base_params_m"],
        "gflops": metadata["gflops"],
        "base_gflops": metadata["base_gflops"],
        "flops_reduction": round(1 - metadata["gflops"] / metadata["base_gflops"], 4),
        "output": str(output),
    }
    if as_json:
        echo_json(summary)
        return
    tokens = (f"{summary['tokens_per_window']} semantic tokens per window" if is_swin
              else f"{summary['tokens']} semantic tokens")
    click.echo(
        f"{source_name} -> {summary['model']} ({tokens})\n"
        f"  GFLOPs  {summary['base_gflops']:.2f} -> {summary['gflops']:.2f} "
        f"({summary['flops_reduction'] * 100:.0f}% fewer)\n"
        f"  params  {summary['base_params_m']:.2f}M -> {summary['params_m']:.2f}M\n"
        f"  saved   {output}/ (config.json, model.safetensors)"
    )
