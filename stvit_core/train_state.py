"""What a fine-tuning run changes as it goes, and the checkpoint that continues it exactly.

A checkpoint (``checkpoints/last.pth``) is written only at optimizer-step boundaries and holds the model,
optimizer, scheduler, EMA, grad scaler, the epoch and the batches done in it, the step count, the running
training loss, the best result so far, the metric rows and every process's RNG states (Python, NumPy,
torch, CUDA). It loads with ``torch.load(weights_only=True)``: plain containers, tensors and numbers only.
"""

from __future__ import annotations

import io
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
from timm.utils import AverageMeter

from .checkpoint import unreadable_checkpoint_message
from .distributed import DistInfo, all_gather_objects, barrier
from .errors import CheckpointError
from .files import atomic_write_bytes
from .loading import architecture_of

__all__ = ["CHECKPOINT_VERSION", "StopSignal", "TrainState", "load_training_checkpoint"]

CHECKPOINT_FORMAT = "stvit-train"
CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """The model, its optimisation state and the run's position; saves and loads itself."""

    model: nn.Module  # the plain model (not the DDP / torch.compile wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[nn.Module] = None  # timm ModelEmaV3
    scaler: Optional[Any] = None  # timm NativeScaler (fp16)
    epoch: int = 0  # the epoch in progress, counted from 0
    batches_done: int = 0  # batches of that epoch already trained
    num_updates: int = 0  # optimizer steps so far
    train_loss: AverageMeter = field(default_factory=AverageMeter)  # over this epoch's batches
    train_seconds: float = 0.0
    best_top1: float = -1.0
    best_epoch: int = -1
    rows: List[Dict[str, Any]] = field(default_factory=list)

    def start_epoch_meters(self) -> None:
        self.train_loss.reset()
        self.train_seconds = 0.0

    def save(self, path: Path, dist: DistInfo, config: Mapping[str, Any]) -> Path:
        """Write the checkpoint atomically (rank 0; every rank contributes its RNG states)."""

        rng = all_gather_objects(_rng_state(), dist)
        if dist.is_main:
            state = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "architecture": architecture_of(self.model),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "batches_done": self.batches_done, "num_updates": self.num_updates,
                "meters": {"loss_sum": self.train_loss.sum, "count": self.train_loss.count,
                           "seconds": self.train_seconds},
                "best": {"top1": self.best_top1, "epoch": self.best_epoch}, "rows": self.rows, "rng": rng,
                "config": dict(config),
            }
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(path, buf.getvalue())
        barrier(dist)
        return path

    def load(self, path: str, dist: DistInfo) -> Dict[str, Any]:
        """Continue from the checkpoint at ``path``; returns where (``epoch``, ``batches_done``, ``step``...)."""
        ckpt = load_training_checkpoint(path)
        _check_same_model(ckpt, self.model, path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise CheckpointError(f"{path} has no EMA weights; resume without --model-ema")
            self.ema.load_state_dict(ckpt["ema"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batches_done, self.num_updates = ckpt["epoch"], ckpt["batches_done"], ckpt["num_updates"]
        meters = ckpt["meters"]
        self.train_loss.reset()
        self.train_loss.sum, self.train_loss.count = meters["loss_sum"], meters["count"]
        self.train_seconds = meters["seconds"]
        self.best_top1, self.best_epoch = ckpt["best"]["top1"], ckpt["best"]["epoch"]
        self.rows = [dict(r) for r in ckpt.get("rows", [])]
        rng = ckpt["rng"]
        _set_rng_state(rng[dist.rank % len(rng)])  # last: nothing may draw from the RNGs after this
        return {"path": str(path), "epoch": self.epoch, "batches_done": self.batches_done,
                "step": self.num_updates, "world_size": dist.world_size, "checkpoint_world_size": len(rng)}


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"resume checkpoint not found: {p}")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # one line, as for any weights file: never torch's advice to turn safety off

        raise CheckpointError(unreadable_checkpoint_message(p, e)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{p} is not a stvit training checkpoint (checkpoints/last.pth of a finetune run)")
    return ckpt


def _check_same_model(ckpt: Mapping[str, Any], model: nn.Module, path: str) -> None:
    arch = architecture_of(model)
    if ckpt.get("architecture") != arch:
        raise CheckpointError(f"resume checkpoint {path} is from model {ckpt.get('architecture')!r}, "
                              f"not {arch!r}")
    own = model.state_dict()
    theirs = ckpt["model"]
    if set(own) != set(theirs) or any(tuple(own[k].shape) != tuple(theirs[k].shape) for k in own):
        raise CheckpointError(f"resume checkpoint {path} is from a differently shaped {arch} "
                              "(other tokens, classes, width or image size)")


def _rng_state() -> Dict[str, Any]:
    """Every RNG state as plain Python values (safe to pickle across ranks and to load with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class StopSignal:
    """SIGINT/SIGTERM set a flag checked at the next optimizer step; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
