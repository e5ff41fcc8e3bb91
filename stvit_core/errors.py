"""Typed errors. Library code raises these; the CLI turns each into one line and an exit code.

Also the two helpers that make one line out of a foreign exception (``first_line``) or an operating-system
error (``describe_os_error``). This module imports nothing heavy, so the CLI can use it on any error path.
"""

from __future__ import annotations

import errno
import importlib
import os
import re
from typing import Any, Callable, Optional, Sequence, Union


class StvitError(Exception):
    """Base class for every error a user can cause (bad input, missing file, offline download...)."""

    exit_code = 1


class InvalidArgumentError(StvitError, ValueError):
    """An argument has a value the model or command cannot take.

    The message may name library parameters as fields: ``{num_semantic_tokens}`` (the name) and
    ``{num_semantic_tokens=}`` (name and value). Each field's parameter is passed as a keyword argument, with its
    value (or None where only the name is shown); braces around any other text are left as they are, so a path
    or value quoted in the message is never mistaken for a field. ``str(error)`` renders library names
    (``num_semantic_tokens=-4``); the CLI renders the options the user typed (``--tokens -4``) with
    :meth:`render`, so no message is rewritten after the fact.
    """

    exit_code = 2

    def __init__(self, message: str, **values: Any) -> None:
        self.template = message
        self.values = values
        self.params = list(values)
        super().__init__(self.render())

    def render(self, term: Optional[Callable[[str, Any, bool], str]] = None) -> str:
        """The message with each field written by ``term(name, value, with_value)`` (library names by default)."""
        term = term or _library_term

        def field(m: "re.Match[str]") -> str:
            name, with_value = m.group(1), bool(m.group(2))
            return term(name, self.values[name], with_value) if name in self.values else m.group(0)

        return _FIELD.sub(field, self.template)

    def __str__(self) -> str:
        return self.render()


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(=?)\}")


def _library_term(name: str, value: Any, with_value: bool) -> str:
    return f"{name}={value}" if with_value else name


class CheckpointError(StvitError):
    """A checkpoint is missing, corrupt, or belongs to another architecture."""


class OutputExistsError(StvitError):
    """The output directory exists and overwriting was not asked for."""


class DownloadError(StvitError):
    """Weights or files could not be downloaded (offline, unknown repo, auth)."""


class DataError(StvitError):
    """A dataset is missing, empty or does not match the model."""


class MissingExtraError(StvitError):
    """An optional dependency (a ``pip install stvit[EXTRA]`` extra) is not installed."""


def require_extra(extra: str, modules: Sequence[str], purpose: str) -> None:
    """Raise one line naming the missing ``modules`` and ``pip install 'stvit[EXTRA]'`` unless all import."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(modules)} (missing: {', '.join(missing)}): "
                                f"pip install 'stvit[{extra}]'")


class TrainingInterrupted(StvitError):
    """SIGINT/SIGTERM arrived during training; a checkpoint was saved and the run stopped cleanly."""

    exit_code = 130


def first_line(error: Union[BaseException, str], limit: int = 300) -> str:
    """The first non-empty line of an error (or text), at most ``limit`` characters; the class name if empty."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        return lines[0][:limit]
    return type(error).__name__ if isinstance(error, BaseException) else ""


# errno values that can only come from writing (or creating) something
_WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EEXIST, errno.ENOTEMPTY}


def describe_os_error(error: OSError) -> str:
    """``cannot write PATH: REASON`` (or ``cannot read``) for an OSError, without a traceback's worth of detail.

    Whether it was a read or a write is told from the error: a missing file whose folder exists, or an
    existing file that cannot be read, was being read; anything else (no permission to create, disk full,
    read-only file system, a file where a folder should be) was a write.
    """
    reason = error.strerror or first_line(error) or type(error).__name__
    path = error.filename
    if path is None:
        return reason
    path = os.fsdecode(path)
    verb = "read" if _is_read(error, path) else "write"
    return f"cannot {verb} {path}: {reason}"


def _is_read(error: OSError, path: str) -> bool:
    if error.errno in _WRITE_ERRNOS:
        return False
    if error.errno == errno.ENOENT:
        return os.path.isdir(os.path.dirname(os.path.abspath(path)))
    if error.errno in (errno.EACCES, errno.EPERM):
        return os.path.exists(path) and not os.access(path, os.R_OK)
    return False
