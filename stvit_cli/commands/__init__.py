"""One module per command; each exports a click command. Order here is the order in ``--help``."""

from .benchmark import benchmark
from .convert import convert
from .env import env

COMMANDS = [convert, benchmark, env]
