"""``stvit predict``: class names and probabilities per image, from a model or an exported .onnx file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click

from ._checks import EarlyError, check_some_input_exists
from ._common import device_option, echo_json, json_option, positive_int, source_model_options


@click.command()
@source_model_options(bare_source_names=False)
@click.argument("images", nargs=-1, required=True, metavar="IMAGE_OR_DIR...")
@click.option("--top-k", "-k", type=positive_int(), default=None, show_default="5, or every class if fewer",
              metavar="K", help="Classes shown per image (at most the model's number of classes).")
@click.option("--batch-size", "-b", type=positive_int(), default=32, show_default=True, metavar="N",
              help="Images per forward pass.")
@device_option
@json_option
def predict(model: str, num_semantic_tokens: Optional[int], semantic_tokens_per_window: Optional[int],
            recovery: bool, images: Tuple[str, ...], top_k: Optional[int], batch_size: int, device: Optional[str],
            as_json: bool) -> None:
    """Classify images with MODEL and its own preprocessing.

    MODEL is a model directory, hf-hub:org/name, an stvit_* name, a timm name with --tokens /
    --tokens-per-window, or an .onnx file from 'stvit export' (run with onnxruntime, preprocessing read from its
    metadata). Directories are searched for images (.png, .jpg, .jpeg, .ppm, .bmp, .pgm, .tif, .tiff, .webp;
    sorted in natural order); photos are turned upright by their EXIF orientation. A file that cannot be read
    is reported on stderr, one 'Error:' line each, the others are still classified, and the exit code is 1.

    \b
    Examples:
      stvit predict runs/fm/best shoe.png shirts/
      stvit predict fm.onnx shirts/ --top-k 3 --json
    """
    # plain arguments first, before stvit_core (torch) is imported: nothing to read fails at once
    options_given = num_semantic_tokens is not None or semantic_tokens_per_window is not None or recovery
    if model.lower().endswith(".onnx") and not options_given and not Path(model).is_file():
        raise EarlyError(f"cannot read {model}: No such file")  # as stvit_core.predict.load_classifier
    check_some_input_exists(images)

    from stvit_core.errors import InvalidArgumentError
    from stvit_core.predict import load_classifier, predict_images

    kwargs: Dict[str, Any] = {"num_semantic_tokens": num_semantic_tokens,
                              "semantic_tokens_per_window": semantic_tokens_per_window, "recovery": recovery}
    classifier = load_classifier(model, device=device, **kwargs)
    fixed = getattr(classifier, "fixed_batch", None)
    given = click.get_current_context().get_parameter_source("batch_size").name != "DEFAULT"
    if fixed and given and batch_size != fixed:  # without -b the file's batch is used
        raise InvalidArgumentError(f"--batch-size {batch_size} cannot apply: {model} was exported with a fixed batch "
                                   f"of {fixed} (pass -b {fixed} or leave --batch-size out)")
    result = predict_images(classifier, images, top_k=top_k, batch_size=batch_size)
    result = {"model": model, **result}
    if as_json:
        echo_json(result)
    else:
        for p in result["predictions"]:
            click.echo(f"{p['image']}: " + ", ".join(f"{c['label']} {c['probability']:.3f}" for c in p["top_k"]))
    for error in result["errors"]:
        click.echo(f"Error: {error['error']}", err=True)
    if result["errors"]:
        click.get_current_context().exit(1)
