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
from .errors import CheckpointError, InvalidArgumentError, first_line
from .files import atomic_write_bytes
from .loading import architecture_of

__all__ = ["CHECKPOINT_VERSION", "RESUMABLE_CHANGES", "StopSignal", "TrainState", "check_same_options",
           "load_training_checkpoint"]

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

    def load(self, path: str, dist: DistInfo, config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Continue from the checkpoint at ``path``; returns where (``epoch``, ``batches_done``, ``step``...).

        ``config``: this run's options (``dataclasses.asdict(TrainConfig)``); each that changes the run (see
        :data:`RESUMABLE_CHANGES` for those that do not) must be the checkpoint's, or this raises naming it.
        """
        ckpt = load_training_checkpoint(path)
        _check_same_model(ckpt, self.model, path)
        if config is not None:
            check_same_options(ckpt["config"], config, path)
        self.model.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # other parameter groups or shapes
            raise CheckpointError(f"{path}: optimizer does not fit this run's optimizer ({first_line(e)})") from None
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
        try:
            _set_rng_state(rng[dist.rank % len(rng)])  # last: nothing may draw from the RNGs after this
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: rng holds an RNG state this torch/NumPy cannot take ({e})") from None
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
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{p}: version is {ckpt.get('version')!r}; this stvit reads version "
                              f"{CHECKPOINT_VERSION} training checkpoints")
    for key, (required, valid, what) in _ENTRIES.items():
        if key not in ckpt or (ckpt[key] is None and not required):
            if required:
                raise CheckpointError(f"{p}: {key} is missing")
            continue
        if not valid(ckpt[key]):
            raise CheckpointError(f"{p}: {key} is {_shown(ckpt[key])}, not {what}")
    return ckpt


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensors(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def _shown(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} of {len(value)} entries"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Every entry TrainState.load reads: (required, check, what it must be). ema and scaler may be None (not used).
_ENTRIES: Dict[str, Any] = {
    "architecture": (True, lambda v: isinstance(v, str) and bool(v), "a model name"),
    "model": (True, _tensors, "a state dict of tensors"),
    "optimizer": (True, lambda v: isinstance(v, Mapping) and isinstance(v.get("state"), Mapping)
                  and isinstance(v.get("param_groups"), list), "an optimizer state dict (state, param_groups)"),
    "scheduler": (True, lambda v: isinstance(v, Mapping), "a scheduler state dict"),
    "ema": (False, _tensors, "a state dict of tensors"),
    "scaler": (False, lambda v: isinstance(v, Mapping), "a grad scaler state dict"),
    "epoch": (True, _whole, "a whole number"),
    "batches_done": (True, _whole, "a whole number"),
    "num_updates": (True, _whole, "a whole number"),
    "meters": (True, lambda v: isinstance(v, Mapping) and _number(v.get("loss_sum")) and _whole(v.get("count"))
               and _number(v.get("seconds")), "{loss_sum, count, seconds}"),
    "best": (True, lambda v: isinstance(v, Mapping) and _number(v.get("top1")) and isinstance(v.get("epoch"), int),
             "{top1, epoch}"),
    "rows": (False, lambda v: isinstance(v, list) and all(isinstance(r, Mapping) for r in v), "a list of metric rows"),
    "rng": (True, lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(r, Mapping) and {"python", "numpy", "torch"} <= set(r) for r in v),
            "a list of each process's RNG states (python, numpy, torch)"),
    "config": (True, lambda v: isinstance(v, Mapping), "the run's options"),
}


# Options a resumed run may change: where the data and outputs are, how it runs (processes, workers, device,
# compilation, determinism) and what it shows or how often it checkpoints. Every other option (seed, batch size,
# epochs, learning rate and schedule, augmentation, EMA, distillation, amp...) shapes what is trained: changing
# it on resume would silently give neither the old run nor a new one.
RESUMABLE_CHANGES = frozenset({"data", "output", "workers", "device", "compile", "deterministic",
                               "checkpoint_every_steps", "quiet"})


def check_same_options(saved: Mapping[str, Any], config: Mapping[str, Any], path: str) -> None:
    """Raise naming the first option of ``config`` that differs from the checkpoint's run (``saved``)."""
    for key, value in config.items():
        if key in RESUMABLE_CHANGES or key not in saved or saved[key] == value:
            continue
        raise InvalidArgumentError(
            f"{{{key}=}} differs from the run being resumed, which has {saved[key]!r} ({path}): a resumed run "
            "continues with its own options (start a new run to change it)", **{key: value})


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
