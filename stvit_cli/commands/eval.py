"""``stvit eval imagenet`` and ``stvit eval folder``: top-1/top-5, loss, img/s, params and GFLOPs."""

from __future__ import annotations

from typing import Any, Dict, Optional

import click

from ._checks import check_data_folder, check_output_file, invalid
from ._common import RecordingGroup, device_option, echo_json, json_option, model_option, non_negative_int, positive_int


def _common_options(func=None, *, data_help: str = "Folder of class folders (or a root with val/); "
                                                    "'fashion-mnist' for the embedded subset."):
    if func is None:
        return lambda f: _common_options(f, data_help=data_help)
    options = [
        model_option("Model directory, hf-hub:org/name or timm name (with its pretrained weights)."),
        click.option("--data", "-d", required=True, metavar="DIR", help=data_help),
        click.option("--batch-size", "-b", type=positive_int(), default=64, show_default=True, metavar="N",
                     help="Images per step."),
        device_option,
        click.option("--workers", type=non_negative_int(), default=2, show_default=True, metavar="N",
                     help="Data loader workers."),
        click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None, show_default="off, float32",
                     help="Autocast to this dtype, on GPU or CPU."),
        json_option,
        click.option("--results-file", default=None, type=click.Path(dir_okay=False), metavar="FILE",
                     help="Also write the results to a .csv or .json file; it must not exist unless --force."),
        click.option("--force", is_flag=True, help="Replace an existing --results-file."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run(imagenet: bool, model_spec: str, data: str, batch_size: int, device: Optional[str], workers: int,
         amp: Optional[str], as_json: bool, results_file: Optional[str], force: bool) -> None:
    # plain arguments first, before stvit_core (torch) is imported: a wrong path fails at once
    if results_file and not (results_file.endswith(".csv") or results_file.endswith(".json")):
        raise invalid(f"--results-file must end in .csv or .json: {results_file}")
    if results_file:
        check_output_file(results_file, force=force)
    elif force:
        raise invalid("--force applies to --results-file only (the file it replaces)")
    check_data_folder(data)

    from stvit_core.evaluate import evaluate_model, write_results_file
    from stvit_core.files import check_output_path

    if results_file:  # an unwritable file fails now, not after the evaluation
        check_output_path(results_file, force=force)
    result = evaluate_model(model_spec, data, imagenet=imagenet, batch_size=batch_size, device=device,
                            workers=workers, amp=amp)
    if not _is_main_process():
        return
    for warning in result["warnings"]:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        echo_json(result)
    else:
        _print(result)
    if results_file:  # after printing: a file that cannot be written does not throw the evaluation away
        write_results_file(results_file, result)


def _is_main_process() -> bool:
    import torch.distributed

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _print(result: Dict[str, Any]) -> None:
    gflops = "n/a" if result["gflops"] is None else f"{result['gflops']:.3f}"
    top5 = "n/a" if result["top5"] is None else f"{result['top5']:.2f}%"  # five classes or fewer: always 100
    click.echo(f"{result['model']}: top-1 {result['top1']:.2f}%  top-5 {top5}  "
               f"loss {result['loss']:.4f}  on {result['images']} images")
    click.echo(f"  {result['img_per_sec']:.1f} img/s on {result['device']} (batch {result['batch_size']}), "
               f"{result['params'] / 1e6:.2f} M params, {gflops} GFLOPs at {result['input_size']}")


@click.group(name="eval", cls=RecordingGroup)
def eval_group() -> None:
    """Evaluate a model: ImageNet-1k validation or any labelled image folder.

    \b
    Examples:
      stvit eval imagenet -m stvit-deit-s -d /data/imagenet/val --json
      stvit eval folder -m runs/fm/best -d fashion-mnist --results-file fm.csv
    """


@eval_group.command()
@_common_options(data_help="ImageNet-1k validation folder of synset folders (or a root with val/).")
def imagenet(**kwargs: Any) -> None:
    """ImageNet-1k validation in synset folders (n01440764/...), with the model's own preprocessing.

    Class indices follow timm's ImageNet-1k synset order; a subset of the 1000 folders is fine.

    \b
    Examples:
      stvit eval imagenet -m stvit-deit-s -d /data/imagenet/val
      stvit eval imagenet -m hf-hub:org/stvit-deit-s -d /data/imagenet --results-file r.csv --json
    """
    _run(True, **kwargs)


@eval_group.command()
@_common_options
def folder(**kwargs: Any) -> None:
    """Any labelled ImageFolder (class folders, or a root with val/).

    Classes map to the model's label_names when it has them (models from 'stvit finetune' do), else to
    the sorted folder names. 'fashion-mnist' names the embedded subset.

    \b
    Examples:
      stvit eval folder -m runs/fm/best -d fashion-mnist
      stvit eval folder -m runs/fm/best -d /data/my_images/val --json
    """
    _run(False, **kwargs)
