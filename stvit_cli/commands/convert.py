"""``stvit convert``: a pretrained DeiT/ViT/Swin (or the official STViT-R release) -> an STViT model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import click

from ._checks import check_checkpoint_file, check_output_dir, exclusive
from ._common import (
    LibraryOption,
    echo_json,
    json_option,
    positive_int,
    source_model_options,
)


@click.command()
@source_model_options
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              show_default="./stvit-MODEL-tTOKENS, ./stvit-r-MODEL-tTOKENS with --recovery, "
                           "./stvit-r-MODEL-wTOKENS_PER_WINDOW for Swin",
              help="Output directory; must not exist unless --force.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Local source weights (.pth/.pt/.bin/.safetensors) instead of downloading.")
@click.option("--no-pretrained", is_flag=True, cls=LibraryOption, library_name="pretrained", help="Random source weights (nothing downloaded).")
@click.option("--image-blocks", "num_image_blocks", type=positive_int(), default=None, show_default="4", metavar="N",
              help="STViT-DeiT/ViT: ordinary blocks before the semantic token generator.")
@click.option("--pool", "semantic_token_pool", type=click.Choice(["max", "avg"]), default="max", show_default=True,
              help="Pooling that initialises the semantic tokens.")
@click.option("--global-tokens/--no-global-tokens", "global_semantic_tokens", cls=LibraryOption,
              library_name="global_semantic_tokens", default=None,
              show_default="on for DeiT/ViT, off for Swin as released",
              help="Learned global semantic tokens in the generator's second layer.")
@click.option("--readout", "global_pool", type=click.Choice(["token", "avg"]), default=None,
              show_default="the source's: token for DeiT, avg for Swin",
              help="Classifier input: the class token, or the average of the semantic tokens (the paper's).")
@click.option("--num-classes", type=positive_int(), default=None, show_default="the source's", metavar="N",
              help="Replace the classifier with one of this size.")
@click.option("--img-size", type=positive_int(), default=None, show_default="the source's", metavar="PIXELS",
              help="Input resolution (position embeddings are resampled).")
@click.option("--force", is_flag=True, help="Overwrite the output directory (atomically).")
@json_option
def convert(model: str, num_semantic_tokens: Optional[int], semantic_tokens_per_window: Optional[int],
            recovery: bool, output: Optional[Path], checkpoint: Optional[Path], no_pretrained: bool,
            num_classes: Optional[int], img_size: Optional[int], force: bool, as_json: bool,
            **architecture: Any) -> None:
    """Convert a pretrained DeiT/ViT/Swin to an STViT model directory.

    MODEL: deit_tiny | deit_small | deit_base | swin_tiny | swin_small | swin_base | a timm DeiT/ViT/Swin name.
    DeiT/ViT become STViT (or STViT-R with --recovery) with --tokens semantic tokens; Swin becomes
    STViT-R-Swin (stage 3 in dumbbell units) with --tokens-per-window. Weights come from timm's pretrained
    checkpoint (Hugging Face Hub download), or --checkpoint FILE, or random with --no-pretrained. A
    --checkpoint from the official STViT-R release (STViT-R-Swin-S.pth / STViT-R-Swin-B.pth) is recognised
    and gives the released model; one of its COCO detectors (cascade_mask_rcnn_swin_small_..._coco.pth) gives
    the detector's backbone (layout='detection', no head, any input size). Writes config.json +
    model.safetensors to the output directory; load it with stvit_core.load_model(DIR) or
    timm.create_model('local-dir:DIR', pretrained=True) (add features_only=True for a feature backbone).

    \b
    Examples:
      stvit convert deit_small --tokens 16
      stvit convert deit_base --tokens 36 --checkpoint deit_base.pth --output stvit-deit-b-36
      stvit convert deit_tiny --no-pretrained --output /tmp/t --json
      stvit convert deit_small --recovery --output stvit-r-deit-s
      stvit convert swin_small --tokens-per-window 9 --output stvit-r-swin-s
      stvit convert swin_small --checkpoint STViT-R-Swin-S.pth --output stvit-r-swin-s-release
      stvit convert swin_small --checkpoint cascade_mask_rcnn_swin_small_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.pth --output stvit-r-swin-s-coco
    """
    # plain arguments first, before stvit_core (torch) is imported: a wrong option or path fails at once
    exclusive(checkpoint=checkpoint is not None, no_pretrained=no_pretrained)
    check_output_dir(output, force=force)  # the default output is named by the library, which checks it
    check_checkpoint_file(checkpoint)

    from stvit_core.convert import convert_to_directory

    source_kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    architecture = {k: v for k, v in architecture.items() if v is not None}
    summary = convert_to_directory(
        model, output, num_semantic_tokens=num_semantic_tokens, semantic_tokens_per_window=semantic_tokens_per_window,
        recovery=recovery, pretrained=not no_pretrained, checkpoint=checkpoint, source_kwargs=source_kwargs,
        force=force, **architecture)
    if as_json:
        echo_json(summary)
    else:
        click.echo(_describe(summary))


def _describe(summary: Dict[str, Any]) -> str:
    tokens = (f"{summary['tokens_per_window']} semantic tokens per window" if summary["tokens_per_window"]
              else f"{summary['tokens']} semantic tokens")
    change = summary["flops_reduction"] * 100
    direction = f"{change:.0f}% fewer" if change >= 0 else f"{-change:.0f}% more"
    return (f"{summary['source_model']} -> {summary['model']} ({tokens})\n"
            f"  GFLOPs  {summary['base_gflops']:.2f} -> {summary['gflops']:.2f} ({direction})\n"
            f"  params  {summary['base_params_m']:.2f}M -> {summary['params_m']:.2f}M\n"
            f"  saved   {summary['output']}/ (config.json, model.safetensors)")
