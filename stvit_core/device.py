"""Device specifications: ``auto`` (or None), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` -> a torch.device that exists."""

from __future__ import annotations

import re
from typing import Optional

import torch

from .errors import InvalidArgumentError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(spec: Optional[str]) -> torch.device:
    """The torch.device for ``spec``; ``None``/``auto`` is CUDA when available, else the CPU.

    Raises InvalidArgumentError for a malformed spec or a device this machine does not have.
    """
    spec = "auto" if spec is None else str(spec).strip().lower()
    if not DEVICE_PATTERN.match(spec):
        raise InvalidArgumentError(f"unknown device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"device {spec!r}: CUDA is not available on this machine (see `stvit env`)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {spec!r}: this machine has only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError(f"device {spec!r}: MPS is not available on this machine")
    return device
