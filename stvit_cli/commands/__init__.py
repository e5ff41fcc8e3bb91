"""One module per command; each exports a click command. Order here is the order in ``--help``."""

from .env import env
from .hub import pull, push_to_hub

COMMANDS = [push_to_hub, pull, env]
