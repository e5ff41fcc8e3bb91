"""Fine-tuning built from timm's parts, on one CPU or many GPUs and machines (torchrun + DDP).

:func:`train` runs the loop along the seams of timm's ``train.py`` and DeiT's ``engine.py``:
:func:`build_data` (timm transforms with RandAugment and random erasing, ``DistributedSampler``),
:func:`build_optimisation` (``create_optimizer_v2`` with optional layer-wise lr decay, ``create_scheduler_v2``
cosine with warm-up updated every optimizer step, ``ModelEmaV3``, ``NativeScaler`` for fp16, Mixup/CutMix with
label smoothing, knowledge distillation from a teacher on the head output), :func:`train_one_epoch`
(autocast, gradient accumulation and clipping) and :func:`end_epoch` (validation, metrics, best model export,
checkpoint). The rest lives beside it: :mod:`stvit_core.train_models` (student, teacher, distillation loss),
:mod:`stvit_core.train_state` (:class:`TrainState`: the checkpoint and exact resume),
:mod:`stvit_core.train_outputs` (the output directory's files), :mod:`stvit_core.distributed` and
:mod:`stvit_core.evaluate` (``validate``, shared with ``stvit eval``).

Exact resume: the data order is a function of (seed, epoch) (``DistributedSampler``) and each sample's
augmentation a function of (seed, epoch, index) (see :mod:`stvit_core.data`), so resuming skips the batches
already seen without loading them and continues bit for bit (CPU, deterministic mode, same number of
processes). Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.utils.data
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, random_seed
from tqdm import tqdm

from . import data as stdata
from .device import autocast
from .distributed import DistInfo, all_reduce_sum, barrier, setup_distributed
from .errors import DataError, InvalidArgumentError, StvitError, TrainingInterrupted
from .evaluate import eval_loader, validate
from .files import copy_file
from .images import IMAGE_EXTENSIONS
from .train_models import DistillationLoss, teacher_for
from .train_outputs import (
    check_output_dir,
    export_model,
    model_record,
    output_directory,
    plot_curves,
    write_metrics,
    write_yaml,
)
from .train_state import StopSignal, TrainState

__all__ = [
    "RECIPES", "TrainConfig", "TrainData", "TrainState", "Optimisation", "TrainingInterrupted", "DistillationLoss",
    "build_data", "build_optimisation", "end_epoch", "resolve_config", "teacher_for",
    "train", "train_one_epoch",
]


# --------------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """Every training option. ``lr`` None means ``base_lr * global_batch / base_batch`` (linear scaling)."""

    data: str = ""
    output: str = ""
    recipe: str = "finetune"
    epochs: int = 30
    batch_size: int = 64  # per process
    accum_steps: int = 1
    lr: Optional[float] = None
    base_lr: float = 5e-4
    base_batch: int = 512
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    sched: str = "cosine"
    opt: str = "adamw"
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    clip_grad: Optional[float] = 5.0
    drop_path: Optional[float] = 0.1
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    aa: Optional[str] = None
    reprob: float = 0.0
    scale_min: float = 0.08
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    distill: Optional[str] = None  # None | "soft" | "hard"
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    amp: Optional[str] = None  # None (fp32) | "bf16" | "fp16": autocast on the run's device (CPU too)
    compile: bool = False
    workers: int = 2
    seed: int = 0
    device: Optional[str] = None
    checkpoint_every_steps: int = 0
    deterministic: bool = False
    quiet: bool = False


# Presets. "paper": SPEC.md section 1 (the released STViT recipe, DeiT's); "finetune": a short, light
# fine-tune of a converted model (DeiT's fine-tuning lr, 1 warm-up epoch, label smoothing only).
RECIPES: Dict[str, Dict[str, Any]] = {
    "finetune": {},
    "paper": dict(
        epochs=300, base_lr=1e-3, base_batch=1024, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=20,
        weight_decay=0.05, clip_grad=5.0, aa="rand-m9-mstd0.5", mixup=0.8, cutmix=1.0, smoothing=0.1,
        reprob=0.25, drop_path=0.1, model_ema=False,
    ),
}


def resolve_config(recipe: Optional[str] = None, yaml_file: Optional[str] = None,
                   overrides: Optional[Mapping[str, Any]] = None,
                   convert: Optional[Callable[[str, Any], Any]] = None) -> TrainConfig:
    """Defaults < recipe < YAML file < explicit overrides (None values in ``overrides`` are ignored).

    ``convert(key, value)`` turns each value of the YAML file (its key as written there) into the option's
    value, raising for a bad one: ``stvit finetune`` passes each through its command-line option's own type,
    so that the file and the flags take the same values.
    """
    values: Dict[str, Any] = {}
    from_yaml: Dict[str, Any] = {}
    if yaml_file:

        try:
            loaded = yaml.safe_load(Path(yaml_file).read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise InvalidArgumentError(f"cannot read config file {yaml_file}: not UTF-8 text (byte "
                                       f"{e.object[e.start]:#04x} at offset {e.start})") from None
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgumentError(f"cannot read config file {yaml_file}: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise InvalidArgumentError(f"config file {yaml_file} must hold a mapping of option: value")
        from_yaml = {str(k).replace("-", "_"): convert(str(k), v) if convert else v for k, v in loaded.items()}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    recipe = overrides.get("recipe") or recipe or from_yaml.get("recipe") or "finetune"
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    values.update(RECIPES[recipe])
    values.update(from_yaml)
    values.update(overrides)
    values["recipe"] = recipe
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidArgumentError(f"unknown config option(s): {', '.join(unknown)}")
    cfg = TrainConfig(**values)
    if cfg.distill not in (None, "soft", "hard"):
        raise InvalidArgumentError(f"distill must be 'soft' or 'hard', not {cfg.distill!r}")
    if cfg.amp not in (None, "bf16", "fp16"):
        raise InvalidArgumentError(f"amp must be 'bf16' or 'fp16', not {cfg.amp!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.accum_steps < 1:
        raise InvalidArgumentError("epochs, batch size and accumulation steps must be at least 1")
    return cfg


# ------------------------------------------------------------------------------------------------ data

@dataclass
class TrainData:
    """The training and validation sets of a run, with the model's preprocessing."""

    train_set: stdata.StrictImageDataset
    val_set: stdata.StrictImageDataset
    sampler: torch.utils.data.DistributedSampler
    class_names: List[str]
    data_config: Dict[str, Any]
    batches_per_epoch: int

    def train_loader(self, epoch: int, skip: int, cfg: TrainConfig, dist: DistInfo) -> torch.utils.data.DataLoader:
        """The epoch's batches after its first ``skip`` (a mid-epoch resume), which are never loaded."""
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        batches = torch.utils.data.BatchSampler(self.sampler, cfg.batch_size, drop_last=True)
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=itertools.islice(batches, skip, None), num_workers=cfg.workers,
            pin_memory=dist.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed + epoch),
        )


def build_data(cfg: TrainConfig, model: nn.Module, dist: DistInfo) -> TrainData:
    """ImageFolder train/val sets with the model's own preprocessing; classes must match the head."""
    root = stdata.resolve_data_root(cfg.data)
    train_dir, val_dir = stdata.split_folder(root, "train"), stdata.split_folder(root, "val")
    if train_dir == val_dir:
        raise DataError(f"{root} needs 'train' and 'val' sub-folders (ImageNet layout)")
    data_config = stdata.model_data_config(model)
    train_tf = stdata.build_transform(data_config, training=True, auto_augment=cfg.aa, re_prob=cfg.reprob,
                                      scale=(cfg.scale_min, 1.0))
    train_set = stdata.folder_dataset(train_dir, train_tf, seed=cfg.seed)
    # timm's reader leaves out a class folder without images: say so, rather than miscount the classes
    empty = [name for name in stdata.folder_classes(train_dir) if name not in train_set.class_to_idx]
    if empty:
        raise DataError(f"class folder {train_dir / empty[0]} has no images ({', '.join(IMAGE_EXTENSIONS)}): add "
                        "its images or remove the folder")
    extra = [name for name in stdata.folder_classes(val_dir) if name not in train_set.class_to_idx]
    if extra:
        raise DataError(f"{val_dir}: class folder {extra[0]!r} has no training folder in {train_dir}")
    val_set = stdata.folder_dataset(val_dir, stdata.build_transform(data_config, training=False),
                                    class_map=train_set.class_to_idx)
    if getattr(model, "num_classes", None) is not None:
        stdata.check_num_classes(train_set, model.num_classes)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=cfg.seed)
    batches_per_epoch = len(sampler) // cfg.batch_size
    if batches_per_epoch == 0:
        raise InvalidArgumentError(f"batch size {cfg.batch_size} is larger than the {len(sampler)} training "
                                   "images per process")
    class_names = sorted(train_set.class_to_idx, key=train_set.class_to_idx.get)
    return TrainData(train_set, val_set, sampler, class_names, data_config, batches_per_epoch)


# ------------------------------------------------------------------------------------------ optimisation

@dataclass
class Optimisation:
    """What turns a batch into an update: optimizer, schedule, EMA, grad scaler, Mixup and the loss."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Optional[nn.Module]
    scaler: Optional[Any]
    mixup_fn: Optional[Callable]
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (images, outputs, targets)
    lr: float
    global_batch: int


def build_optimisation(cfg: TrainConfig, model: nn.Module, teacher: Optional[nn.Module], data: TrainData,
                       dist: DistInfo) -> Optimisation:
    """timm's factories, as timm's train.py uses them; the lr scales linearly with the global batch."""

    global_batch = cfg.batch_size * cfg.accum_steps * dist.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / cfg.base_batch
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
                                       updates_per_epoch=math.ceil(data.batches_per_epoch / cfg.accum_steps))
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    scaler = NativeScaler(device=dist.device.type) if cfg.amp == "fp16" else None  # fp16 autocasts on CPU too
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=model.num_classes)
        base_loss: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        base_loss = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        base_loss = nn.CrossEntropyLoss()
    if cfg.distill:
        teacher = teacher.to(dist.device).eval().requires_grad_(False)
        loss_fn: Callable = DistillationLoss(base_loss, teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau)
    else:
        loss_fn = lambda images, outputs, targets: base_loss(outputs, targets)  # noqa: E731
    return Optimisation(optimizer, scheduler, ema, scaler, mixup_fn, loss_fn, lr, global_batch)


# ------------------------------------------------------------------------------------------------ epoch

def _forward_backward(model: nn.Module, state: TrainState, opt: Optimisation, images: torch.Tensor,
                      targets: torch.Tensor, cfg: TrainConfig, dist: DistInfo, need_update: bool) -> torch.Tensor:
    """One micro-batch: forward, backward and, when ``need_update``, clip and step (timm's train_one_epoch)."""

    images = images.to(dist.device, non_blocking=True)
    targets = targets.to(dist.device, non_blocking=True)
    if opt.mixup_fn is not None:
        images, targets = opt.mixup_fn(images, targets)
    with nullcontext() if need_update or not dist.distributed else model.no_sync():
        with autocast(dist.device, cfg.amp):
            loss = opt.loss_fn(images, model(images), targets)
        if not torch.isfinite(loss):
            raise StvitError(f"loss is {loss.item()} at epoch {state.epoch + 1}, step {state.num_updates}; "
                             "lower the learning rate or use bf16 instead of fp16")
        scaled = loss / cfg.accum_steps
        if opt.scaler is not None:
            opt.scaler(scaled, opt.optimizer, clip_grad=cfg.clip_grad or None, parameters=state.model.parameters(),
                       need_update=need_update)
        else:
            scaled.backward()
            if need_update:
                if cfg.clip_grad:
                    dispatch_clip_grad(state.model.parameters(), cfg.clip_grad)
                opt.optimizer.step()
    return loss


def train_one_epoch(model: nn.Module, state: TrainState, opt: Optimisation, data: TrainData, cfg: TrainConfig,
                    dist: DistInfo, *, stop: StopSignal, out: Path) -> None:
    """The rest of epoch ``state.epoch`` from batch ``state.batches_done``; ``model`` may be DDP-wrapped.

    Saves a checkpoint every ``cfg.checkpoint_every_steps`` updates, and on SIGINT/SIGTERM before raising
    :class:`TrainingInterrupted`.
    """

    if state.batches_done == 0:
        state.start_epoch_meters()
    loader = data.train_loader(state.epoch, state.batches_done, cfg, dist)
    model.train()
    bar = tqdm(total=data.batches_per_epoch, initial=state.batches_done, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
               disable=cfg.quiet or not dist.is_main or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
    tick = time.perf_counter()
    try:
        for i, (images, targets) in enumerate(loader, start=state.batches_done):
            need_update = (i + 1) % cfg.accum_steps == 0 or i + 1 == data.batches_per_epoch
            loss = _forward_backward(model, state, opt, images, targets, cfg, dist, need_update)
            state.train_loss.update(loss.item(), images.shape[0])
            if not need_update:
                continue
            opt.optimizer.zero_grad(set_to_none=True)
            state.num_updates += 1
            opt.scheduler.step_update(num_updates=state.num_updates)
            if state.ema is not None:
                state.ema.update(state.model, step=state.num_updates)
            now = time.perf_counter()
            state.train_seconds, tick, state.batches_done = state.train_seconds + now - tick, now, i + 1
            bar.update(i + 1 - bar.n)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{state.train_loss.count * dist.world_size / max(state.train_seconds, 1e-9):.0f}")
            if all_reduce_sum([float(stop.requested)], dist)[0] > 0:
                path = state.save(out / "checkpoints" / "last.pth", dist, dataclasses.asdict(cfg))
                raise TrainingInterrupted(f"interrupted at epoch {state.epoch + 1}, step {state.num_updates}; "
                                          f"checkpoint saved, continue with --resume {path}")
            if cfg.checkpoint_every_steps and state.num_updates % cfg.checkpoint_every_steps == 0 \
                    and i + 1 < data.batches_per_epoch:
                state.save(out / "checkpoints" / "last.pth", dist, dataclasses.asdict(cfg))
    except DataError as e:
        stdata.reraise_loader_error(e)
    finally:
        bar.close()


def end_epoch(state: TrainState, data: TrainData, cfg: TrainConfig, dist: DistInfo, out: Path, *,
              metadata: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate (and the EMA), write the metrics, export a new best model, checkpoint; returns the row."""
    loss_sum, count, seconds = all_reduce_sum([state.train_loss.sum, state.train_loss.count, state.train_seconds],
                                              dist)
    metrics = validate(state.model, eval_loader(data.val_set, cfg.batch_size, cfg.workers, dist), dist, amp=cfg.amp)
    row: Dict[str, Any] = {
        "epoch": state.epoch + 1, "step": state.num_updates, "lr": state.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / max(count, 1), "val_loss": metrics["loss"], "top1": metrics["top1"],
        "top5": metrics["top5"], "ema_top1": None, "ema_top5": None, "epoch_seconds": seconds / dist.world_size,
        "train_img_per_sec": count / max(seconds / dist.world_size, 1e-9),
    }
    if state.ema is not None:
        ema = validate(state.ema.module, eval_loader(data.val_set, cfg.batch_size, cfg.workers, dist), dist,
                       amp=cfg.amp)
        row["ema_top1"], row["ema_top5"] = ema["top1"], ema["top5"]
    state.rows.append(row)
    is_best = row["top1"] > state.best_top1
    if is_best:
        state.best_top1, state.best_epoch = row["top1"], row["epoch"]
    if dist.is_main:
        write_metrics(out, state.rows)
        if is_best:
            export_model(state.model, out / "best", class_names=data.class_names, data_config=data.data_config,
                         metadata={**metadata, "finetuned": {"top1": row["top1"], "top5": row["top5"],
                                                             "epoch": row["epoch"], "dataset": cfg.data,
                                                             "images": metrics["images"]}},
                         results={"dataset": cfg.data, "top1": row["top1"], "top5": row["top5"],
                                  "num_images": metrics["images"], "split": "val"})
    state.epoch, state.batches_done = state.epoch + 1, 0
    state.start_epoch_meters()
    last = state.save(out / "checkpoints" / "last.pth", dist, dataclasses.asdict(cfg))
    if is_best and dist.is_main:
        copy_file(last, out / "checkpoints" / "best.pth")
    return row


# ------------------------------------------------------------------------------------------------ train

def _wrap(model: nn.Module, cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    if dist.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


def train(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    teacher: Optional[nn.Module] = None,
    resume: Optional[str] = None,
    force: bool = False,
    on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None,
    on_resume: Optional[Callable[[Dict[str, Any]], None]] = None,
    extra_config: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Fine-tune ``model`` on ``cfg.data`` (ImageFolder with train/ and val/), writing to ``cfg.output``.

    ``on_resume`` receives where a ``resume`` continues (``path``, ``epoch``, ``batches_done``, ``step``,
    ``world_size``, ``checkpoint_world_size``), ``on_epoch_end`` each epoch's metrics row (rank 0 only).
    ``model.stvit_metadata`` (set by :func:`stvit_core.load_model`), if any, is carried into
    ``best/config.json``. Returns the last epoch's metrics plus ``best_top1``, ``best_epoch`` and ``output``.
    Raises :class:`TrainingInterrupted` after saving a checkpoint when SIGINT/SIGTERM arrives.
    """

    dist = setup_distributed(cfg.device)  # an unknown or missing device fails before any work
    out = check_output_dir(cfg.output, resume=bool(resume), force=force)
    if cfg.distill and teacher is None:
        raise InvalidArgumentError("distillation needs a teacher model (--teacher)")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    random_seed(cfg.seed, dist.rank)
    data = build_data(cfg, model, dist)
    opt = build_optimisation(cfg, model.to(dist.device), teacher, data, dist)
    state = TrainState(model, opt.optimizer, opt.scheduler, opt.ema, opt.scaler)
    if resume:
        where = state.load(resume, dist, dataclasses.asdict(cfg))
        if on_resume is not None and dist.is_main:
            on_resume(where)
    wrapped = _wrap(model, cfg, dist)
    config = {**dataclasses.asdict(cfg), "resolved_lr": opt.lr, "global_batch": opt.global_batch,
              "world_size": dist.world_size, **model_record(model), "classes": data.class_names,
              "input_size": list(data.data_config["input_size"]), **dict(extra_config or {})}
    with output_directory(out, dist, resume=bool(resume), force=force), StopSignal() as stop:
        if dist.is_main and (not resume or state.epoch < cfg.epochs):  # a finished run's record stays as it is
            write_yaml(out / "config.yaml", config)
        while state.epoch < cfg.epochs:
            train_one_epoch(wrapped, state, opt, data, cfg, dist, stop=stop, out=out)
            row = end_epoch(state, data, cfg, dist, out, metadata=getattr(model, "stvit_metadata", None) or {})
            if on_epoch_end is not None and dist.is_main:
                on_epoch_end(row)
        if dist.is_main and state.rows:
            plot_curves(state.rows, out / "curves.png")
    barrier(dist)
    return {**(state.rows[-1] if state.rows else {}), "best_top1": state.best_top1, "best_epoch": state.best_epoch,
            "output": str(out), "world_size": dist.world_size, "classes": len(data.class_names)}
