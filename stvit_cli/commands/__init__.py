"""One module per command; each exports a click command. Order here is the order in ``--help``."""

from .env import env

COMMANDS = [env]
