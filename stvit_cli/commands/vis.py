"""``stvit vis``: what each semantic token looks at, drawn for every image (stvit_core.vis)."""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Tuple

import click

from ._checks import check_figures_folder, check_some_input_exists
from ._common import (
    LibraryOption,
    device_option,
    echo_json,
    json_option,
    model_argument,
    non_negative_int,
    quiet_option,
    tokens_option,
    tokens_per_window_option,
)


@click.command()
@model_argument
@click.argument("images", nargs=-1, required=True, metavar="IMAGE_OR_DIR...")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for the figures (created; must not hold files unless --force).")
@click.option("--force", is_flag=True, help="Replace an existing --output folder and everything in it.")
@tokens_option(default_help="16 when MODEL is a name to convert")
@tokens_per_window_option
@click.option("--no-pretrained", is_flag=True, cls=LibraryOption, library_name="pretrained",
              help="Random weights for a model name (to try the command; the picture then shows no learned content). "
                   "Not with --checkpoint.")
@click.option("--checkpoint", default=None, metavar="FILE", show_default="the name's pretrained weights",
              help="Weights file for a model name (the source's, converted on the fly); not for a model directory.")
@click.option("--layer", type=non_negative_int(), default=None, show_default="the last generator layer", metavar="N",
              help="Generator layer whose attention is drawn, from 0 (0: the pooled tokens' first look; Swin: the "
                   "local, per-window layer).")
@click.option("--unit", type=non_negative_int(), default=None, show_default="the last unit", metavar="N",
              help="STViT-R: the dumbbell unit whose generator is drawn, from 0. Not for STViT (one generator).")
@click.option("--fill", type=click.Choice(["colour", "mean"]), default="colour", show_default=True,
              help="Partition regions: a colour each, or the mean colour of their pixels (as ToMe draws merges).")
@click.option("--sheet", is_flag=True, help="Also write contact-sheet.png: every image and its partition.")
@device_option
@quiet_option
@json_option
def vis(model: str, images: Tuple[str, ...], output: str, force: bool, num_semantic_tokens: Optional[int],
        semantic_tokens_per_window: Optional[int], no_pretrained: bool, checkpoint: Optional[str],
        layer: Optional[int], unit: Optional[int], fill: str, sheet: bool, device: Optional[str],
        quiet: Optional[bool], as_json: bool) -> None:
    """Draw what MODEL's semantic tokens look at in each image: one PNG per image in --output.

    Each figure shows the input as the model sees it (its own resize, crop and normalisation, undone), the
    partition (every image token coloured by the semantic token that attends to it most, regions outlined),
    and each semantic token's attention over the image. MODEL is a model directory, hf-hub:org/name, an
    stvit_* name, or a timm DeiT/ViT/Swin name converted on the fly (--tokens, --tokens-per-window) with its
    pretrained weights or --checkpoint FILE. IMAGE_OR_DIR are image files or folders (searched recursively). --output must not hold files
    unless --force (which replaces it). An image that cannot be read is named on stderr and the others are still drawn; the exit code is then 1.

    \b
    Examples:
      stvit vis runs/fm/best stvit_core/data/fashion_mnist_subset/val/bag --output vis --sheet
      stvit vis stvit-deit-s cat.jpg dog.jpg --output vis --fill mean
      stvit vis stvit-r-swin_small-w9 street.jpg --output vis --unit 0 --layer 0 --json
    """
    # plain arguments first, before stvit_core (torch) is imported: a wrong path fails at once
    check_figures_folder(output, force=force)
    check_some_input_exists(images)

    from stvit_core import load_model
    from stvit_core.device import resolve_device
    from stvit_core.vis import check_vis_arguments, check_vis_output, image_sources

    check_vis_output(output, force=force)  # before the model is built
    target = resolve_device(device)
    net = load_model(model, num_semantic_tokens=num_semantic_tokens, semantic_tokens_per_window=semantic_tokens_per_window,
                     pretrained=not no_pretrained, checkpoint=checkpoint, convert=True)
    check_vis_arguments(net, layer, unit)  # bad --layer / --unit / model: before anything is written
    sources, problems = image_sources(images)
    for problem in problems:
        click.echo(f"Error: {problem}", err=True)
    options = dict(layer=layer, unit=unit, fill=fill, sheet=sheet, force=force)
    report = _draw(net.to(target).eval(), sources, output, options,
                   show_progress=not (quiet or as_json) and sys.stderr.isatty() and len(sources) > 1)
    if as_json:
        echo_json({"model": model, **report})
    elif report["files"] and not quiet:
        sheet_note = f" and {report['sheet']}" if report["sheet"] else ""
        click.echo(f"{len(report['files'])} figure(s) in {output}{sheet_note}")
    if problems or report["failed"]:
        click.get_current_context().exit(1)


def _draw(model: Any, sources: list, output: str, options: Dict[str, Any], show_progress: bool) -> Dict[str, Any]:
    from tqdm import tqdm

    from stvit_core.vis import visualise_images

    with tqdm(total=len(sources), desc="vis", unit="image", disable=not show_progress, leave=False) as bar:
        def on_image(record: Dict[str, Any]) -> None:
            if "error" in record:
                tqdm.write(f"Error: {record['error']}", file=sys.stderr)
            bar.update(1)

        return visualise_images(model, sources, output, on_image=on_image, **options)
