"""Which torch device a command runs on, checked before any model or data work, and its autocast.

One resolver for every entry point (``train``, ``evaluate_model``, the benchmark): ``None`` or ``"auto"`` is
CUDA when available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are accepted when this machine
has them; anything else is an :class:`~stvit_core.errors.InvalidArgumentError` naming ``--device``.
``--amp bf16|fp16`` is torch's autocast on whichever of these runs (CPU too: torch autocasts both there).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional, Union

import torch

from .errors import InvalidArgumentError

__all__ = ["autocast", "resolve_device"]

_CHOICES = "use cpu, cuda, cuda:N, mps or auto"
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: Optional[Union[str, torch.device]] = None) -> torch.device:
    """The device ``spec`` names, checked to exist here; ``None``/``"auto"``: CUDA if available, else CPU."""
    if spec is None or str(spec).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(spec).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):  # 'tpu', 'cuda:x', 'GPU'...
        raise InvalidArgumentError(f"--device {text!r} is not a device: {_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA "
                                       f"device(s), numbered from 0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidArgumentError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise InvalidArgumentError(f"--device {text}: {device.type} devices are not supported; {_CHOICES}")
    return device


def autocast(device: torch.device, amp: Optional[str]) -> ContextManager:
    """bf16/fp16 autocast on ``device`` for ``amp`` 'bf16'/'fp16' (torch's own, CPU included); a no-op without.

    A device torch has no autocast for is an :class:`~stvit_core.errors.InvalidArgumentError` naming ``--amp``,
    never a silent float32 run.
    """
    if amp is None:
        return nullcontext()
    if amp not in _AMP_DTYPES:
        raise InvalidArgumentError(f"--amp {amp!r}: use bf16 or fp16")
    if not torch.amp.is_autocast_available(device.type):
        raise InvalidArgumentError(f"--amp {amp}: torch has no autocast on {device.type}; leave --amp out")
    return torch.autocast(device.type, dtype=_AMP_DTYPES[amp])
