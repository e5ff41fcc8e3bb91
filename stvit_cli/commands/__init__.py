"""One module per command; each exports a click command. Order here is the order in ``--help``."""

from .env import env
from .eval import eval_group
from .finetune import finetune

COMMANDS = [finetune, eval_group, env]
