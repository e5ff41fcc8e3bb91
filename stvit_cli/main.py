"""The ``stvit`` click group. Each command lives in ``stvit_cli/commands/<name>.py``."""

from __future__ import annotations

import sys

import click

# Nothing here imports stvit_core at start-up: it imports timm and torch (seconds), which `stvit --help`,
# `stvit --version` and a usage error do not need. Commands import it when they run.


class StvitGroup(click.Group):
    """A click group that turns library errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except Exception as e:
            errors = sys.modules.get("stvit_core.errors")  # loaded by whatever raised a library error
            if errors is None or not isinstance(e, errors.StvitError):
                raise
            click.echo(f"Error: {e}", err=True)
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
    Examples:
      stvit convert deit_small --tokens 16 --output stvit-deit-s
      stvit benchmark deit_small --tokens 16 --device cpu
      stvit env
    """


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


def main() -> None:
    _quiet_libraries()
    cli(prog_name="stvit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
