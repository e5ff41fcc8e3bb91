"""Which torch device a command runs on, checked before any model or data work, and its autocast.

One resolver for every entry point (``train``, ``evaluate_model``, the benchmark): ``None`` or ``"auto"`` is
CUDA when available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are accepted when this machine
has them; anything else is an :class:`~stvit_core.errors.InvalidArgumentError` naming ``--device``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional, Union

import torch

from .errors import InvalidArgumentError

__all__ = ["autocast", "resolve_device"]

_CHOICES = "use cpu, cuda, cuda:N, mps or auto"


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
    """bf16/fp16 autocast on CUDA for ``amp`` 'bf16'/'fp16'; a no-op on other devices or without ``amp``."""
    if amp is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
