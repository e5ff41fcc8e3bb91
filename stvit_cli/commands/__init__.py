"""One module per command; each exports a click command (``--help`` lists them alphabetically)."""

from .benchmark import benchmark
from .convert import convert
from .demo import demo
from .env import env
from .eval import eval_group
from .export import export
from .finetune import finetune
from .hub import pull, push_to_hub
from .predict import predict
from .vis import vis

COMMANDS = [demo, convert, finetune, eval_group, benchmark, export, predict, vis, push_to_hub, pull, env]
