"""timm's feature-extraction conventions shared by the model families."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["take_indices"]


def take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]] = None) -> Tuple[List[int], int]:
    """timm's ``forward_intermediates`` index rule: ``None`` all, an int the last n, a sequence (negative from
    the end). Returns ``(indices, max index)``. (timm's own helper lives in a private module.)"""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        taken = list(range(num_features - indices, num_features))
    else:
        taken = []
        for i in indices:
            if not -num_features <= i < num_features:
                raise ValueError(f"feature index {i} is out of range (0 to {num_features - 1})")
            taken.append(i % num_features)
    return taken, max(taken)

