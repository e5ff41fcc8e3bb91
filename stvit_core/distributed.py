"""One process of a job launched by torchrun (or alone): its rank, world size and device.

:func:`setup_distributed` resolves ``--device`` first (:func:`stvit_core.device.resolve_device`), then joins
the process group the environment describes through timm's ``init_distributed_device`` (torchrun's
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, or SLURM's; nccl on CUDA, gloo on CPU). Alone, nothing is joined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, List, Optional

import torch
import torch.distributed
from timm.utils import init_distributed_device, world_info_from_env

from .device import resolve_device

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_sum", "barrier", "setup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job; the defaults describe a single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Resolve ``device`` (raises InvalidArgumentError before any work) and join the job's process group."""

    resolved = resolve_device(device)
    if torch.distributed.is_initialized():  # joined already (train, then evaluate, in one process)
        local_rank = world_info_from_env()[0]
        if resolved.type == "cuda":
            resolved = torch.device("cuda", local_rank)
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, resolved)
    args = SimpleNamespace(device=str(resolved))
    joined = init_distributed_device(args)
    return DistInfo(args.rank, args.world_size, args.local_rank, joined)


def all_reduce_sum(values: List[float], dist: DistInfo) -> List[float]:
    """Element-wise sums over every process (float64, so counts stay exact)."""
    if not dist.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj: Any, dist: DistInfo) -> List[Any]:
    """Every process's ``obj``, in rank order."""
    if not dist.distributed:
        return [obj]
    gathered: List[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        torch.distributed.barrier()
