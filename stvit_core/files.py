"""Writing files so that nothing half-written is ever left behind, and checking an output path before slow work.

Everything is written under a temporary name next to its final place and moved into place when complete (on
one file system that is atomic), so a crash, a full disk, Ctrl-C or SIGTERM leaves the old output or nothing.
What is moved into place gets the permissions a plain ``open()`` / ``mkdir()`` would give. Without ``force``, an
output that appeared while the work ran (another writer of the same path) is never replaced: of two writers,
exactly one wins and the other gets the "already exists" error it would get had it started second. A write
that fails (a full disk, a read-only file system), whatever library did the writing, is one error naming the
output: ``cannot write PATH: No space left on device``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import InvalidArgumentError, OutputExistsError, StvitError, first_line

PathLike = Union[str, os.PathLike]

# How Rust's std::io::Error reads inside a foreign error's message (safetensors raises SafetensorError, not
# OSError): "I/O error: No space left on device (os error 28)" or "IoError(Os { code: 28, ... })".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")

# errno values only a write gives
_WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}

# Where a file system has no hard links, the exclusive final step falls back to check-then-rename.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def file_in_the_way(folder: Path) -> Optional[Path]:
    """The first of ``folder`` and its parents that exists as something other than a folder (so nothing can be
    written under ``folder``), or None."""
    return next((p for p in (folder, *folder.parents) if os.path.lexists(p) and not p.is_dir()), None)


def exists_message(output: PathLike) -> str:
    return f"{output} already exists (use --force to overwrite)"


def write_failure(error: BaseException, where: Path) -> Optional[str]:
    """Why writing under ``where`` failed, when ``error`` is a failed write, else None.

    An OSError gives its reason; a foreign error that carries an operating-system error in its text (Rust's
    ``(os error 28)``) gives that error's reason; any other error raised while the file system under ``where``
    has no space left is a full disk (torch's stream writer says only "file write failed").
    """
    if isinstance(error, StvitError) or not isinstance(error, Exception):
        return None
    if isinstance(error, OSError):
        return error.strerror or first_line(error)
    match = _RUST_OS_ERROR.search(str(error))
    if match:
        return os.strerror(int(match.group(1) or match.group(2)))
    return os.strerror(errno.ENOSPC) if _no_space_left(where) else None


def _no_space_left(where: Path) -> bool:
    existing = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    try:
        stats = os.statvfs(existing)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return stats.f_bavail == 0


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_directory(output_dir: PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``output_dir`` only if the block succeeds.

    Raises OutputExistsError when ``output_dir`` exists and ``force`` is False, before any work is done, and
    also at the end if it appeared meanwhile (the final name is claimed with an exclusive ``mkdir``).
    """
    output_dir = Path(output_dir)
    exists = os.path.lexists(output_dir)  # a dangling symbolic link is something in the way too
    if exists and not force:
        raise OutputExistsError(exists_message(output_dir))
    if exists and not output_dir.is_dir():
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
    claimed = False
    try:
        yield tmp
        umask = _umask()
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp makes 0700; safetensors, like mkstemp, writes 0600
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if force:
            old = None
            if os.path.lexists(output_dir):
                old = parent / f".{output_dir.name}.old-{os.getpid()}"
                os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            if old is not None:
                _remove(old)
        else:
            try:  # the claim: of two writers, one makes the folder and the other learns it exists
                os.mkdir(output_dir)
            except FileExistsError:
                raise OutputExistsError(exists_message(output_dir)) from None
            claimed = True
            os.replace(tmp, output_dir)  # onto our own empty claim
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if claimed:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)  # our empty claim (a finished rename leaves it non-empty)
        reason = write_failure(e, tmp)
        if reason is not None:  # a full disk, whichever library wrote: name the output, not the temporary
            raise StvitError(f"cannot write {output_dir}: {reason}") from None
        raise


def _umask() -> int:
    # Temporary names are created private (mkstemp 0600, mkdtemp 0700); what is renamed into place gets the
    # permissions a plain open()/mkdir() would give, so that a team can read a shared output directory.
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _place_file(tmp: Path, path: Path, force: bool) -> None:
    """Move a finished temporary file onto ``path``; without ``force``, never over a file that appeared."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with EEXIST, atomically, if another writer got there first
    except FileExistsError:
        raise OutputExistsError(exists_message(path)) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):  # no hard links here: check, then rename (a narrow window instead of none)
            raise OutputExistsError(exists_message(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write_bytes(path: PathLike, data: bytes, *, force: bool = True) -> None:
    """Write a file under a temporary name in the same directory, then rename it into place.

    ``force`` False: an existing ``path`` is not replaced (OutputExistsError), even one that appeared meanwhile.
    """
    path = Path(path)
    with temporary_file(path) as tmp:
        tmp.write_bytes(data)
        rename_into_place(tmp, path, force=force)


def copy_file(source: PathLike, path: PathLike, *, force: bool = True) -> None:
    """Copy ``source`` to ``path`` through a temporary name: a failed copy (a full disk) leaves nothing."""
    path = Path(path)
    with temporary_file(path) as tmp:
        shutil.copyfile(source, tmp)
        rename_into_place(tmp, path, force=force)


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
    ``force``; a dangling symbolic link exists too) or its folder cannot be written."""
    refuse_folder_name(output)
    output = Path(output)
    if output.is_dir():
        raise OutputExistsError(f"{output} is a directory; the export is one file")
    if os.path.lexists(output) and not force:
        raise OutputExistsError(exists_message(output))
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
    """A temporary sibling of ``output``, removed when the block ends unless renamed into place.

    A failed write inside the block (an OSError about the temporary file, or any library's full-disk error)
    is reported as ``cannot write OUTPUT``: the user never hears of the temporary name.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".{output.name}.tmp-", suffix=suffix, dir=output.parent)
    except OSError as e:
        raise StvitError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except Exception as e:
        reason = None if _about_another_file(e, tmp) else write_failure(e, tmp)
        if reason is not None:
            raise StvitError(f"cannot write {output}: {reason}") from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _about_another_file(error: BaseException, tmp: Path) -> bool:
    """An OSError about some other file than ``tmp`` (an input that cannot be read). shutil names the source of
    a copy as the error's file even when the copy's target filled the disk: a full disk is always a write."""
    if not isinstance(error, OSError) or error.filename is None or error.errno in _WRITE_ONLY_ERRNOS:
        return False
    return str(tmp) not in {os.fsdecode(name) for name in (error.filename, error.filename2) if name is not None}


def rename_into_place(tmp: Path, output: Path, *, force: bool = True) -> None:
    """Rename a finished temporary file onto ``output``, with the permissions a plain ``open()`` gives.

    ``force`` False: an ``output`` that appeared since it was checked is not replaced (OutputExistsError).
    """
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        _place_file(tmp, output, force)
    except OSError as e:
        raise StvitError(f"cannot write {output}: {e.strerror or first_line(e)}") from None
