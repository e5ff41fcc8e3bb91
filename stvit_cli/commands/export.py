"""``stvit export``: ONNX or ``torch.export`` (.pt2) file of an STViT model, checked against PyTorch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import click

from ._checks import check_output_file, exclusive, invalid
from ._common import LibraryOption, echo_json, json_option, positive_int, source_model_options


@click.command()
@source_model_options(bare_source_names=False)
@click.option("--format", "format_", type=click.Choice(["onnx", "pt2"]), default="onnx", show_default=True,
              help="onnx (torch.onnx.export, dynamo exporter; needs pip install 'stvit[export]') or pt2 "
                   "(torch.export.save).")
@click.option("--output", "-o", type=click.Path(path_type=str), required=True, metavar="FILE",
              help="The file to write (e.g. model.onnx); must not exist unless --force.")
@click.option("--opset", type=click.IntRange(min=1), default=None, show_default="torch's default", metavar="N",
              help="ONNX opset version (ONNX only). The exporter builds opset 18 and converts to N; an opset it "
                   "cannot convert to is an error.")
@click.option("--batch-size", "-b", type=positive_int(), default=None, show_default="dynamic", metavar="B",
              help="Fix the batch dimension at B (checked at B).")
@click.option("--dynamic-batch", is_flag=True,
              help="A dynamic batch dimension (the default; checked at batch 1 and 3).")
@click.option("--features", "features_only", is_flag=True, cls=LibraryOption, library_name="features_only",
              help="Export the feature maps of an STViT-R model (timm's features_only) instead of the logits.")
@click.option("--no-pretrained", is_flag=True, cls=LibraryOption, library_name="pretrained",
              help="A source or stvit_* name with random weights instead of its pretrained ones (nothing "
                   "downloaded; for trying the export).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@json_option
def export(model: str, num_semantic_tokens: Optional[int], semantic_tokens_per_window: Optional[int],
           recovery: bool, format_: str, output: str, opset: Optional[int], batch_size: Optional[int],
           dynamic_batch: bool, features_only: bool, no_pretrained: bool, force: bool, as_json: bool) -> None:
    """Export MODEL to ONNX or torch.export and check the written file against PyTorch.

    MODEL is a model directory (from 'stvit convert' or 'stvit finetune'), hf-hub:org/name, an stvit_* name, or
    a timm DeiT/ViT/Swin name converted on the fly with --tokens / --tokens-per-window / --recovery. The file
    is written under a temporary name, run at batch 1 and 3 (at B with --batch-size) on the inputs PyTorch
    runs (onnxruntime for ONNX, torch.export.load for pt2), and kept only if the largest absolute difference
    is at most 1e-4. An ONNX file carries the preprocessing (mean, std, input size, crop, interpolation) and
    the class names in its metadata: see docs/deploy.md.

    \b
    Examples:
      stvit export runs/fm/best --output fm.onnx
      stvit export stvit-deit-s --format pt2 --output stvit-deit-s.pt2 --batch-size 1
      stvit export swin_tiny --tokens-per-window 9 --features --output backbone.onnx --no-pretrained
    """
    # plain arguments first, before stvit_core (torch) is imported: a wrong option or path fails at once
    exclusive(batch_size=batch_size is not None, dynamic_batch=dynamic_batch)
    if opset is not None and format_ != "onnx":
        raise invalid(f"--opset applies to ONNX only, not --format {format_}")
    suffix = Path(output).suffix.lower()
    if suffix in (".onnx", ".pt2") and suffix != f".{format_}" and not output.endswith(("/", os.sep)):
        raise invalid(f"--format {format_} writes a .{format_} file, not {Path(output).name}")
    check_output_file(output, force=force)  # on the text: Path() drops a trailing separator

    from stvit_core import load_model
    from stvit_core.errors import require_extra
    from stvit_core.export import export_model, features_model
    from stvit_core.files import check_output_path
    from stvit_core.onnx_runtime import ONNX_MODULES

    output = Path(output)
    if format_ == "onnx":
        require_extra("export", ONNX_MODULES, "ONNX export")
    check_output_path(output, force=force)  # before the model is built: an existing or unwritable output fails now
    stvit = load_model(model, num_semantic_tokens=num_semantic_tokens, semantic_tokens_per_window=semantic_tokens_per_window,
                       recovery=recovery, pretrained=not no_pretrained, stvit_only=True).eval()
    if features_only:
        stvit = features_model(stvit)
    result = export_model(stvit, output, format=format_, batch_size=batch_size, opset=opset, force=force)
    if as_json:
        echo_json(result)
        return
    click.echo(summary(result))


def summary(r: Dict[str, Any]) -> str:
    """Two lines: what was written, and how it was checked."""
    kind = f"ONNX opset {r['opset']}" if r["format"] == "onnx" else "torch.export (.pt2)"
    batch = "dynamic batch" if r["dynamic_batch"] else f"batch {r['batch_size']}"
    checks = ", ".join(f"{c['max_abs_diff']:.2g} at batch {c['batch_size']}" for c in r["checks"])
    return (f"exported {r['model']} -> {r['output']} ({kind}, {batch}, {', '.join(r['outputs'])}, "
            f"{r['size_mb']:.1f} MB)\n"
            f"checked with {r['checked_with']}: max abs diff {checks} (tolerance {r['tolerance']:g})")
