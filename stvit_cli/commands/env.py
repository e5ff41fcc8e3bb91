"""``stvit env``: versions and devices, for bug reports (torch's own ``collect_env`` plus stvit's libraries)."""

from __future__ import annotations

import click

from ._common import echo_json, json_option


@click.command()
@json_option
def env(as_json: bool) -> None:
    """Print the versions of stvit, Python, torch, timm and huggingface_hub, CUDA and the devices.

    \b
    Examples:
      stvit env
      stvit env --json
    """
    from stvit_core.env import environment_info

    info = environment_info()
    if as_json:
        echo_json(info)
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) if value else "none"
        click.echo(f"{key:<{width}}  {value}")
