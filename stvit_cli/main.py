"""The ``stvit`` click group. Each command lives in ``stvit_cli/commands/<name>.py``."""

from __future__ import annotations

import sys

import click

from stvit_core import __version__
from stvit_core.errors import StvitError


class StvitGroup(click.Group):
    """A click group that turns library errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StvitError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=StvitGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="stvit")
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
