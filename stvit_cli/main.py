"""The ``stvit`` click group. Each command lives in ``stvit_cli/commands/<name>.py``.

Every failure a user can cause ends the same way, whatever the command: one line ``Error: ...`` on stderr and
a non-zero exit code, never a traceback (see docs/cli.md):

* 2: a usage error found by click (unknown option, value out of range, missing argument) or an invalid
  argument found by stvit_core (``InvalidArgumentError``), whose parameter fields are written as the option the
  user typed (``num_semantic_tokens`` -> ``--tokens``);
* 1: any other ``StvitError`` (missing or corrupt file, offline download, existing output...) and any
  ``OSError`` (a path that cannot be written or read: ``cannot write PATH: REASON``);
* 130: interrupted (Ctrl-C); 143: terminated (SIGTERM), after the same clean-up as Ctrl-C.

A newline in the message (a path can hold one) is written as ``\\n``, so the error stays one line. With
``-q/--quiet`` a command also silences Python warnings (DataLoader's, Pillow's...).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import click

from .commands._common import RecordingGroup

# Nothing here imports stvit_core at start-up: it imports timm and torch (seconds), which `stvit --help`,
# `stvit --version` and a usage error do not need. Commands import it when they run.


def _option_names(commands: Iterable[click.Command]) -> Dict[str, Tuple[str, bool]]:
    """Library parameter name -> (the option's long flag, is it a flag) for the options of the commands run."""
    names: Dict[str, Tuple[str, bool]] = {}
    for command in commands:
        for param in command.params:
            if not isinstance(param, click.Option) or not param.name:
                continue
            flag = max(param.opts, key=len)
            for name in {param.name, getattr(param, "library_name", None)} - {None}:
                names[name] = (flag, param.is_flag)
    return names


def cli_terms(names: Dict[str, Tuple[str, bool]]) -> Callable[[str, Any, bool], str]:
    """How an InvalidArgumentError's parameter fields read in the CLI: the option the user typed
    (``{num_semantic_tokens=}`` with -4 -> ``--tokens -4``; a flag alone: ``--recovery``)."""
    def term(name: str, value: Any, with_value: bool) -> str:
        if name not in names:
            return f"{name}={value}" if with_value else name
        flag, is_flag = names[name]
        return f"{flag} {value}" if with_value and not is_flag else flag

    return term


def _first_empty_argument(args: Sequence[str]) -> Optional[str]:
    """An empty argument (``-o ""``, ``--output=``, often an unset shell variable) names nothing: click would take
    it as a path to the current directory, or as an empty name. No stvit option or argument takes one."""
    why = "a path, name or value cannot be empty (an unset shell variable?)"
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg and not arg.partition("=")[2].strip():
            return f"the value of {arg.partition('=')[0]} is empty: {why}"
        if not arg.strip():
            where = f"the value of {args[i - 1]}" if i and args[i - 1].startswith("-") else "an argument"
            return f"{where} is empty ({arg!r}): {why}"
    return None


def _usage_line(error: click.ClickException) -> str:
    message = " ".join(error.format_message().split())
    ctx: Optional[click.Context] = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it runs every clean-up Ctrl-C runs (temporary files and
    folders removed, a run's lock released): `kill`, a job scheduler's stop and a container's stop are not
    crashes."""


def _raise_terminated(_signum: int, _frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated()


def _handle_sigterm() -> None:
    # Only where SIGTERM would kill the process outright: a handler installed by whoever started us stays.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)


def _one_line(message: str, limit: int = 2000) -> str:
    """The message on one line: a newline or carriage return (a path can hold one) is written escaped."""
    return message.strip().replace("\r", "\\r").replace("\n", "\\n")[:limit]


def _echo_error(message: str) -> None:
    click.echo(f"Error: {_one_line(message)}", err=True)


def _compile_failure(error: BaseException) -> Optional[BaseException]:
    """torch.compile's backend failure (inductor's ``BackendCompilerFailed``: no working C++ compiler, a
    compile error), if that is what ``error`` is or was raised from."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if any(c.__name__ == "BackendCompilerFailed" and c.__module__.startswith("torch.")
               for c in type(error).__mro__):
            return error
        error = error.__cause__ or error.__context__
    return None


class StvitGroup(RecordingGroup):
    """The top-level group: turns every error a user can cause into one line on stderr and an exit code."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        _quiet_libraries()
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        empty = _first_empty_argument(sys.argv[1:] if args is None else list(args))
        if empty is not None:
            _echo_error(empty)
            sys.exit(2)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:  # click would print usage + hint + message: three lines
            if type(e).__name__ == "NoArgsIsHelpError":  # `stvit` or `stvit eval` alone asks for the help
                click.echo(e.format_message())
                sys.exit(0)
            _echo_error(_usage_line(e))
            sys.exit(e.exit_code)
        except click.Abort as e:  # click's own: a KeyboardInterrupt outside a command
            if isinstance(e.__context__, Terminated):
                _echo_error("terminated")
                sys.exit(143)
            _echo_error("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        environ = os.environ.get("PYTHONWARNINGS")
        try:
            with warnings.catch_warnings():  # what a command's --quiet silences comes back after it
                return self._invoke(ctx)
        finally:
            if environ is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = environ

    def _invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated):
                _echo_error("terminated")
                ctx.exit(143)
            _echo_error("interrupted")
            ctx.exit(130)
        except click.ClickException:
            raise
        except OSError as e:  # an unwritable output, a disk full, a file gone: whatever command it was
            from stvit_core.errors import describe_os_error

            _echo_error(describe_os_error(e))
            ctx.exit(1)
        except Exception as e:
            errors = sys.modules.get("stvit_core.errors")  # loaded by whatever raised a library error
            if errors is not None and _out_of_memory(e):  # a batch too large for the device: the user's to change
                _echo_error(f"out of memory ({errors.first_line(_allocator_message(e), limit=300)}); try a "
                            "smaller batch size")
                ctx.exit(1)
            compile_error = _compile_failure(e)
            if errors is not None and compile_error is not None:  # e.g. no C++ compiler: 100+ lines from inductor
                _echo_error(f"torch.compile failed: {errors.first_line(compile_error)}; run without --compile")
                ctx.exit(1)
            if errors is None or not isinstance(e, errors.StvitError):
                raise
            message = str(e)
            if isinstance(e, errors.InvalidArgumentError):
                message = e.render(cli_terms(_option_names(ctx.meta.get("stvit.commands", []))))
            _echo_error(message)
            ctx.exit(e.exit_code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stvit")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from stvit_core import __version__

        return __version__


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        click.echo(f"stvit {_version()}")
        ctx.exit()


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=StvitGroup, context_settings=CONTEXT_SETTINGS)
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
def cli() -> None:
    """Semantic-token vision transformers: convert, fine-tune, evaluate, benchmark and share.

    \b
    Errors are one line on stderr, "Error: ...", with exit code 2 for a usage error or an invalid
    argument, 1 for anything else (missing file, offline, unwritable output), 130 when interrupted,
    143 when terminated (SIGTERM).

    \b
    Examples:
      stvit convert deit_small --tokens 16 --output stvit-deit-s
      stvit benchmark deit_small --tokens 16 --device cpu
      stvit env
    """


def _out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory errors: ``torch.OutOfMemoryError`` (CUDA, MPS) and the CPU allocator's RuntimeError."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))


def _allocator_message(e: BaseException) -> str:
    # the CPU allocator's message starts with a C++ source location: "[enforce fail at alloc_cpu.cpp:127] err == 0."
    return re.sub(r"^\[enforce fail at [^]]*\] err == 0\. ", "", str(e).strip()) or type(e).__name__


def _register_commands() -> None:
    from .commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register_commands()


def _quiet_libraries() -> None:
    # huggingface_hub logs every retry as a warning; the CLI reports failures itself, in one line.
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    logging.getLogger("timm").setLevel(logging.ERROR)
    # torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on a CUDA build of
    # torch without a GPU: nothing the user asked about, and it broke the one-line stderr of `stvit benchmark`
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main() -> None:
    _handle_sigterm()  # the console script only: a program that calls the group keeps its own SIGTERM handling
    cli(prog_name="stvit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
