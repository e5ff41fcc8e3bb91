"""Layers shared by the STViT model families.

pooling (index maths, pooling as a gather), attention (cross-attention and its blocks), semantic (the generators
and recovery), local (the detection layout's local generator and recovery), dumbbell (STViT-R's unit and its
state-dict layout), patch (the patch projection as one GEMM), features (timm's feature-index rule).
"""

from .attention import *  # noqa: F401,F403
from .attention import __all__ as _attention_all
from .dumbbell import *  # noqa: F401,F403
from .dumbbell import __all__ as _dumbbell_all
from .features import *  # noqa: F401,F403
from .features import __all__ as _features_all
from .local import *  # noqa: F401,F403
from .local import __all__ as _local_all
from .patch import *  # noqa: F401,F403
from .patch import __all__ as _patch_all
from .pooling import *  # noqa: F401,F403
from .pooling import __all__ as _pooling_all
from .semantic import *  # noqa: F401,F403
from .semantic import __all__ as _semantic_all

__all__ = [*_pooling_all, *_attention_all, *_semantic_all, *_local_all, *_dumbbell_all, *_patch_all, *_features_all]
