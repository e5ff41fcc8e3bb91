"""Small helpers shared by the command modules."""

from __future__ import annotations

import json
from typing import Any

import click


def echo_json(obj: Any) -> None:
    """Print one JSON object on stdout (machines read it; nothing else goes to stdout with --json)."""
    click.echo(json.dumps(obj, indent=2, default=str))
