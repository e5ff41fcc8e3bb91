"""Writing files so that nothing half-written is ever left behind, and checking an output path before slow work.

Everything is written under a temporary name next to its final place and renamed into place when complete
(``os.replace`` is atomic on one file system), so a crash, a full disk or Ctrl-C leaves the old output or
nothing. What is renamed into place gets the permissions a plain ``open()`` / ``mkdir()`` would give.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import InvalidArgumentError, OutputExistsError, StvitError, first_line

PathLike = Union[str, os.PathLike]


def file_in_the_way(folder: Path) -> Optional[Path]:
    """The first of ``folder`` and its parents that exists as something other than a folder (so nothing can be
    written under ``folder``), or None."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


@contextlib.contextmanager
def atomic_directory(output_dir: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``output_dir`` only if the block succeeds.

    Raises OutputExistsError when ``output_dir`` exists and ``force`` is False, before any work is done.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise OutputExistsError(f"{output_dir} already exists (use --force to overwrite)")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"{output_dir} exists and is not a directory")
    parent = output_dir.parent if str(output_dir.parent) else Path(".")
    blocking_file = file_in_the_way(parent)
    if blocking_file is not None:
        raise StvitError(f"cannot write {output_dir}: {blocking_file} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=parent))
    except OSError as e:  # name the output the user gave, not the folder its temporary sibling was made in
        raise StvitError(f"cannot write {output_dir}: {e.strerror or e}") from None
    try:
        yield tmp
        umask = _umask()
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp makes 0700; safetensors, like mkstemp, writes 0600
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        old = None
        if output_dir.exists():
            old = parent / f".{output_dir.name}.old-{os.getpid()}"
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StvitError(f"cannot write {output_dir}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    # Temporary names are created private (mkstemp 0600, mkdtemp 0700); what is renamed into place gets the
    # permissions a plain open()/mkdir() would give, so that a team can read a shared output directory.
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write a file under a temporary name in the same directory, then rename it into place."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise StvitError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk, a folder in the way: name the file, not the temporary name
            raise StvitError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def refuse_folder_name(output: Union[str, os.PathLike]) -> None:
    """An output path that ends in a path separator names a folder (``Path()`` would drop the separator and
    write a file of that name): InvalidArgumentError."""
    text = os.fspath(output)
    if isinstance(text, str) and text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        suffix = "".join(Path(text).suffixes) or ".onnx"
        raise InvalidArgumentError(f"{text} ends in {text[-1]}, so it names a folder; the output is one file: name it "
                                   f"(e.g. {text}model{suffix})")


def check_output_path(output: Union[str, os.PathLike], *, force: bool = False) -> Path:
    """Fail now, before any slow work, if ``output`` names a folder (ends in a path separator), exists (without
    ``force``) or its folder cannot be written."""
    refuse_folder_name(output)
    output = Path(output)
    if output.is_dir():
        raise OutputExistsError(f"{output} is a directory; the export is one file")
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists (use --force to overwrite)")
    parent = output.parent
    blocking_file = file_in_the_way(parent)
    if blocking_file is not None:
        raise StvitError(f"cannot write {output}: {blocking_file} is a file, not a folder")
    if not parent.is_dir():
        raise StvitError(f"cannot write {output}: folder {parent} does not exist")
    with temporary_file(output):  # a real write: permissions, read-only file systems, root on /sys
        pass
    return output


@contextlib.contextmanager
def temporary_file(output: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of ``output``, removed when the block ends unless renamed into place."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{output.name}.tmp-", suffix=suffix, dir=output.parent)
    except OSError as e:
        raise StvitError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def rename_into_place(tmp: Path, output: Path) -> None:
    """Rename a finished temporary file onto ``output``, with the permissions a plain ``open()`` gives."""
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, output)
    except OSError as e:
        raise StvitError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
