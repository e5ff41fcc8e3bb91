"""stvit: semantic-token vision transformers (STViT / STViT-R, CVPR 2023) for timm.

Importing this package registers the STViT models with timm's registry, so that
``timm.create_model('stvit_deit_small_patch16_224')`` and ``timm.create_model('hf-hub:org/name')``
work for STViT checkpoints.
"""

__version__ = "0.1.0"

from . import models  # noqa: F401,E402  (registers the models with timm)
from .checkpoint import load_model, save_model  # noqa: E402
from .errors import StvitError  # noqa: E402
from .flops import count_flops  # noqa: E402

__all__ = ["__version__", "count_flops", "load_model", "save_model", "StvitError", "models"]
