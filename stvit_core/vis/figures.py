"""The files of ``stvit vis``: which images to draw, and the output folder their figures are written into.

The folder is written as every stvit output is: under a temporary name beside it, renamed into place when
complete (:func:`stvit_core.files.atomic_directory`), so an existing folder is refused without ``force`` and
replaced with it, and a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..data import build_transform, model_data_config
from ..errors import DataError, InvalidArgumentError, OutputExistsError
from ..files import atomic_directory
from ..images import find_images, read_image
from .attention import check_vis_arguments, semantic_token_attention, token_partition
from .draw import FILLS, render_contact_sheet, render_figure

__all__ = ["CONTACT_SHEET_NAME", "ImageSource", "check_vis_output", "image_sources", "visualise_images"]

PathLike = Union[str, os.PathLike]
CONTACT_SHEET_NAME = "contact-sheet"


@dataclass(frozen=True)
class ImageSource:
    """An image to draw: its file and the name of its figure (``NAME.png`` in the output folder)."""

    path: Path
    name: str


def image_sources(paths: Sequence[PathLike]) -> Tuple[List[ImageSource], List[str]]:
    """Image files from files and folders (:func:`stvit_core.images.find_images`), and one message per path
    that gives none (missing, or a folder without images).

    Figure names are the file's stem (its path below the folder, ``/`` as ``_``, for files found in a
    folder); repeated names get ``-2``, ``-3``...; the contact sheet's name is never used for an image.
    """
    found: List[Tuple[Path, str]] = []
    problems: List[str] = []
    for given in map(Path, paths):
        images, errors = find_images([given])
        problems += [error["error"] for error in errors]
        found += [(p, "_".join((p.relative_to(given) if given.is_dir() else Path(p.name)).with_suffix("").parts))
                  for p in images]
    used = {CONTACT_SHEET_NAME}
    sources = []
    for path, name in found:
        unique, n = name, 1
        while unique in used:
            n += 1
            unique = f"{name}-{n}"
        used.add(unique)
        sources.append(ImageSource(path, unique))
    return sources, problems


def check_vis_output(output: PathLike, *, force: bool = False) -> Path:
    """``output`` as a Path; OutputExistsError when it exists and holds files and ``force`` is not given (an
    empty folder is used as it is)."""
    output = Path(output)
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputExistsError(f"{output} already exists (use --force to overwrite)")
    return output


@dataclass
class _Preprocessing:
    transform: Any
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module) -> "_Preprocessing":
        config = model_data_config(model)
        return cls(build_transform(config, training=False), torch.tensor(config["mean"]).view(3, 1, 1),
                   torch.tensor(config["std"]).view(3, 1, 1))

    def shown(self, tensor: torch.Tensor) -> np.ndarray:
        """The model's input un-normalised: ``(H, W, 3)`` uint8, the image as the model sees it."""
        rgb = (tensor.cpu() * self.std + self.mean).clamp(0, 1)
        return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _write_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=True)


def _render_batch(model: nn.Module, batch: List[Tuple[ImageSource, torch.Tensor]], prep: _Preprocessing,
                  folder: Path, output: Path, settings: Dict[str, Any], sheet: Optional[list]) -> List[Dict[str, Any]]:
    """Draw a batch into ``folder`` (the temporary one); the records name the files' final place in ``output``."""
    images = torch.stack([tensor for _, tensor in batch])
    attention = semantic_token_attention(model, images, settings["layer"], settings["unit"]).float().cpu()
    settings.update(tokens=attention.shape[1], grid_size=list(attention.shape[2:]))
    partition = token_partition(attention)
    written = []
    for (source, tensor), attn, part in zip(batch, attention.numpy(), partition.numpy()):
        shown = prep.shown(tensor)
        _write_png(render_figure(shown, attn, part, settings["fill"], title=source.path.name),
                   folder / f"{source.name}.png")
        written.append({"image": str(source.path), "file": str(output / f"{source.name}.png")})
        if sheet is not None:
            sheet.append((source.path.name, shown, part))
    return written


class _NothingDrawn(Exception):
    """No image could be read: the temporary folder is dropped and no output is left behind."""


def visualise_images(
    model: nn.Module,
    sources: Sequence[ImageSource],
    output: PathLike,
    *,
    layer: Optional[int] = None,
    unit: Optional[int] = None,
    fill: str = "colour",
    sheet: bool = False,
    batch_size: int = 16,
    force: bool = False,
    on_image: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Write ``OUTPUT/NAME.png`` (:func:`~stvit_core.vis.render_figure`) for every source, and
    ``contact-sheet.png`` with ``sheet``.

    The model runs on the device its parameters are on, with its own preprocessing. An image that cannot be
    read does not stop the others: it is reported (``{'image', 'error'}``) and skipped. ``output`` must not
    hold files unless ``force`` (then it is replaced); it is written under a temporary name and renamed into
    place when complete, and not at all when no figure could be drawn. ``on_image`` is called once per source
    with ``{'image', 'file'}`` or ``{'image', 'error'}``.
    Returns ``{'files', 'sheet', 'failed', 'layer', 'unit', 'tokens', 'grid_size'}``.
    """
    if fill not in FILLS:
        raise InvalidArgumentError(f"fill={fill!r} is not one of {', '.join(FILLS)}")
    layer, unit = check_vis_arguments(model, layer, unit)
    output = check_vis_output(output, force=force)
    settings = {"layer": layer, "unit": unit, "fill": fill}
    prep = _Preprocessing.of(model)
    report: Dict[str, Any] = {"files": [], "sheet": None, "failed": [], "layer": layer, "unit": unit,
                              "tokens": None, "grid_size": None}
    entries: Optional[list] = [] if sheet else None
    notify = on_image or (lambda record: None)
    missing_parents = [p for p in output.parents if not p.exists()]  # deepest first, to undo
    try:
        # an empty folder is replaced as well (check_vis_output let it through)
        with atomic_directory(output, force=True) as folder:
            for start in range(0, len(sources), batch_size):
                batch = []
                for source in sources[start:start + batch_size]:
                    try:
                        batch.append((source, prep.transform(read_image(source.path))))
                    except DataError as e:
                        report["failed"].append({"image": str(source.path), "error": str(e)})
                        notify(report["failed"][-1])
                if batch:
                    for record in _render_batch(model, batch, prep, folder, output, settings, entries):
                        report["files"].append(record["file"])
                        notify(record)
            if not report["files"]:
                raise _NothingDrawn
            report.update(tokens=settings.get("tokens"), grid_size=settings.get("grid_size"))
            if entries:
                report["sheet"] = str(output / f"{CONTACT_SHEET_NAME}.png")
                _write_png(render_contact_sheet(entries, fill), folder / f"{CONTACT_SHEET_NAME}.png")
    except _NothingDrawn:  # nothing to show for it: leave no folder behind, not even the parents made for it
        for folder in missing_parents:
            with contextlib.suppress(OSError):
                folder.rmdir()
    return report
