"""stvit: semantic-token vision transformers (STViT / STViT-R, CVPR 2023) for timm.

Importing this package registers the STViT models with timm's registry, so that
``timm.create_model('stvit_deit_small_patch16_224')`` and ``timm.create_model('hf-hub:org/name')``
work for STViT checkpoints.

The public API: :func:`load_model` (every kind of model spec: a name to convert, an ``stvit_*`` name, a model
directory, ``hf-hub:``), :func:`convert_model` (a timm model -> its STViT version), :func:`convert_to_directory`
(``stvit convert``), :func:`save_model` and :func:`count_flops`.
"""

from . import models  # (registers the models with timm)
from .checkpoint import save_model
from .convert import convert_model, convert_to_directory
from .errors import StvitError
from .flops import count_flops
from .loading import load_model
from .version import __version__

__all__ = [
    "__version__", "convert_model", "convert_to_directory", "count_flops", "load_model", "models", "save_model",
    "StvitError",
]
