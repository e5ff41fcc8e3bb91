"""Checks of plain arguments (paths, options that exclude each other) made before stvit_core is imported.

Importing stvit_core imports torch and timm, seconds of start-up: a missing data folder or an output that
exists should fail before that. Each check here ends in the line and exit code the library gives for the same
argument (the library checks again when the command runs; tests/test_early_checks.py compares the two
messages), so failing early changes nothing but the time it takes. Only checks that need no stvit_core are here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import click

PathLike = Union[str, os.PathLike]

USAGE_EXIT_CODE = 2  # an invalid argument (stvit_core.errors.InvalidArgumentError)
FAILURE_EXIT_CODE = 1  # a missing file, an existing output (the other stvit_core errors)

# stvit_core.data: the names of the embedded dataset (resolve_data_root) and of a root's split folders
EMBEDDED_DATA_NAMES = ("embedded", "fashion-mnist", "fashion_mnist", "fashion_mnist_subset")
TRAIN_FOLDER_NAMES = ("train", "training")
EVAL_FOLDER_NAMES = ("val", "validation", "valid", "eval", "evaluation", "test")


class EarlyError(click.ClickException):
    """An error found before stvit_core is imported, printed as the library's would be: ``Error: MESSAGE``."""

    def __init__(self, message: str, exit_code: int = FAILURE_EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def invalid(message: str) -> EarlyError:
    """An invalid argument (exit code 2), as InvalidArgumentError; ``message`` names the options as typed."""
    return EarlyError(message, USAGE_EXIT_CODE)


def exclusive(**given: bool) -> None:
    """``--a and --b exclude each other`` when both options (given as ``a_b=True``) are set."""
    names = [f"--{name.replace('_', '-')}" for name, is_set in given.items() if is_set]
    if len(names) == len(given) == 2:
        raise invalid(f"{names[0]} and {names[1]} exclude each other")


def exists_message(output: PathLike) -> str:
    """stvit_core.files / convert / demo / vis: an output that exists without --force."""
    return f"{output} already exists (use --force to overwrite)"


def check_data_folder(spec: str, split: str = "val") -> None:
    """stvit_core.data.resolve_data_root + split_folder: the data folder exists, is a folder, and a root of split
    folders has one for ``split``."""
    if spec.lower() in EMBEDDED_DATA_NAMES:
        return
    folder = Path(spec)
    if folder.exists() and not folder.is_dir():
        raise EarlyError(f"{folder} is a file: the data is a folder of class folders (or a root with train/ and val/)")
    if not folder.is_dir():
        raise EarlyError(f"data folder not found: {folder}")
    names = TRAIN_FOLDER_NAMES if split in TRAIN_FOLDER_NAMES else EVAL_FOLDER_NAMES
    if not any((folder / name).is_dir() for name in (split, *names)) and any(
            (folder / name).is_dir() for name in TRAIN_FOLDER_NAMES + EVAL_FOLDER_NAMES):
        raise EarlyError(f"{folder} has no '{split}' folder")


def check_output_file(output: PathLike, *, force: bool) -> None:
    """stvit_core.files.check_output_path, the part that reads no more than the path: a name ending in a path
    separator, a folder, an existing file (a dangling symbolic link too) without --force."""
    text = os.fspath(output)
    if isinstance(text, str) and text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        suffix = "".join(Path(text).suffixes) or ".onnx"
        raise invalid(f"{text} ends in {text[-1]}, so it names a folder; the output is one file: name it "
                      f"(e.g. {text}model{suffix})")
    path = Path(output)
    if path.is_dir():
        raise EarlyError(f"{path} is a directory; the export is one file")
    if os.path.lexists(path) and not force:
        raise EarlyError(exists_message(path))


def check_output_dir(output: Optional[PathLike], *, force: bool) -> None:
    """stvit_core.files.atomic_directory: an output folder that exists (a dangling symbolic link too) without
    --force."""
    if output is not None and not force and os.path.lexists(output):
        raise EarlyError(exists_message(Path(output)))


def check_figures_folder(output: PathLike, *, force: bool) -> None:
    """stvit_core.vis.check_vis_output: a folder that holds files, without --force (an empty one is used)."""
    path = Path(output)
    if path.is_dir() and any(path.iterdir()) and not force:
        raise EarlyError(exists_message(path))


def check_checkpoint_file(path: Optional[PathLike]) -> None:
    """stvit_core.checkpoint.load_state_dict_file: the weights file exists."""
    if path is not None and not Path(path).is_file():
        raise EarlyError(f"checkpoint not found: {Path(path)}")


def missing_path_message(path: PathLike) -> str:
    """stvit_core.images.find_images: a path given that does not exist."""
    return f"cannot read {Path(path)}: No such file or directory"


def check_some_input_exists(paths: Sequence[PathLike]) -> None:
    """Images and folders to read: when none of them exists there is nothing to do, so each is reported as the
    library reports a missing path (one ``Error:`` line each) and the command stops with exit code 1 before the
    model is loaded. When some exist, the library reports the missing ones and goes on with the others."""
    missing: List[Path] = [Path(p) for p in paths if not Path(p).exists()]
    if paths and len(missing) == len(paths):
        for path in missing[:-1]:
            click.echo(f"Error: {missing_path_message(path)}", err=True)
        raise EarlyError(missing_path_message(missing[-1]))
