"""Fine-tuning built from timm's parts, on one CPU or many GPUs and machines (torchrun + DDP).

One call, :func:`train`, runs the loop: timm transforms (RandAugment, random erasing), Mixup/CutMix with
label smoothing, ``create_optimizer_v2`` (AdamW, optional layer-wise lr decay), ``create_scheduler_v2``
(cosine with warm-up, updated every optimizer step), ``ModelEmaV3``, gradient clipping and accumulation,
bf16/fp16 autocast on GPU, ``torch.compile``, and knowledge distillation from a teacher on the head output.

Exact resume: a checkpoint is written only at optimizer-step boundaries and holds the model, optimizer,
scheduler, EMA, grad scaler, epoch, number of batches done in that epoch, step and every rank's RNG states.
The data order is a function of (seed, epoch) (``DistributedSampler``) and each sample's augmentation a
function of (seed, epoch, index) (see :mod:`stvit_core.data`), so resuming skips the batches already seen
without loading them and continues bit for bit (CPU, deterministic mode, same number of processes).

Layout of OUT: ``config.yaml`` (the resolved config), ``metrics.csv`` + ``metrics.jsonl`` (one row per
epoch), ``curves.png`` (if matplotlib is installed), ``checkpoints/last.pth`` and ``checkpoints/best.pth``
(training state), ``best/`` (the best model in the ``stvit convert`` format: config.json +
model.safetensors). Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data

from . import data as stdata
from .checkpoint import atomic_write_bytes, save_model
from .errors import CheckpointError, DataError, InvalidArgumentError, OutputExistsError, StvitError

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class TrainingInterrupted(StvitError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and training stopped cleanly."""

    exit_code = 130


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
    amp: Optional[str] = None  # None (fp32) | "bf16" | "fp16"; autocast is used on CUDA only
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
                   overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Defaults < recipe < YAML file < explicit overrides (None values in ``overrides`` are ignored)."""
    values: Dict[str, Any] = {}
    from_yaml: Dict[str, Any] = {}
    if yaml_file:
        import yaml

        try:
            loaded = yaml.safe_load(Path(yaml_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgumentError(f"cannot read config file {yaml_file}: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise InvalidArgumentError(f"config file {yaml_file} must hold a mapping of option: value")
        from_yaml = {k.replace("-", "_"): v for k, v in loaded.items()}
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


# ------------------------------------------------------------------------------------------ distributed

@dataclass
class DistInfo:
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
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("--device cuda asked for, but CUDA is not available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _all_reduce_sum(values: List[float], dist: DistInfo) -> List[float]:
    if not dist.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _barrier(dist: DistInfo) -> None:
    if dist.distributed:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------ data

class _SkipBatches(torch.utils.data.Sampler):
    """A batch sampler that drops the first ``skip`` batches (mid-epoch resume) without loading them."""

    def __init__(self, batch_sampler: torch.utils.data.BatchSampler, skip: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[List[int]]:
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


class _ShardSampler(torch.utils.data.Sampler):
    """Every ``world``-th index from ``rank``: each sample is evaluated exactly once across ranks."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, dist: DistInfo):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=_ShardSampler(len(dataset), dist.rank, dist.world_size),
        num_workers=workers, pin_memory=dist.device.type == "cuda", persistent_workers=False,
    )


# ---------------------------------------------------------------------------------------------- models

def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def architecture_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _is_path_like(spec: str) -> bool:
    """A model directory or hub id rather than a model name."""
    from .checkpoint import is_model_dir

    return spec.startswith(("local-dir:", "hf-hub:")) or is_model_dir(spec) or "/" in spec or os.sep in spec


def create_model_for_training(
    spec: str,
    *,
    tokens: Optional[int] = None,
    pretrained: bool = True,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
    drop_path: Optional[float] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Build the model to fine-tune from a model directory, ``hf-hub:`` id, or a name.

    A name of a plain timm model (``deit_small``, ``deit_tiny_patch16_224``...) is converted on the fly to
    STViT with ``tokens`` semantic tokens (``stvit_core.convert``); an ``stvit_*`` name is built directly.
    ``num_classes`` resets the head when it differs from the checkpoint's.
    """
    try:
        return _create_model_for_training(spec, tokens=tokens, pretrained=pretrained, checkpoint=checkpoint,
                                          num_classes=num_classes, drop_path=drop_path, model_kwargs=model_kwargs)
    except (AssertionError, TypeError, ValueError) as e:  # timm constructors reject bad --model-arg values so
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgumentError(f"cannot build {spec} with {dict(model_kwargs or {})}: {msg}") from None


def _create_model_for_training(spec: str, *, tokens: Optional[int], pretrained: bool, checkpoint: Optional[str],
                               num_classes: Optional[int], drop_path: Optional[float],
                               model_kwargs: Optional[Mapping[str, Any]]) -> nn.Module:
    from .checkpoint import load_model

    kwargs: Dict[str, Any] = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if _is_path_like(spec):
        if checkpoint:
            raise InvalidArgumentError("--checkpoint applies to model names only; a model directory has weights")
        return load_model(spec, pretrained=pretrained, **kwargs)
    if spec.startswith("stvit_"):
        if tokens is not None:
            kwargs["num_semantic_tokens"] = tokens
        model = load_model(spec, pretrained=pretrained and not checkpoint, **kwargs)
        if checkpoint:
            _load_weights(model, checkpoint)
        return model
    from .convert import convert

    # The source keeps its own head (its checkpoint's, or --model-arg num_classes) so its weights load
    # strictly; --num-classes resets the converted model's head after.
    source_kwargs = {k: v for k, v in (model_kwargs or {}).items() if k != "drop_path_rate"}
    model = convert(spec, num_semantic_tokens=16 if tokens is None else tokens, pretrained=pretrained,
                    checkpoint=checkpoint, source_kwargs=source_kwargs,
                    **({"drop_path_rate": drop_path} if drop_path is not None else {}))
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": num_classes}
    return model


def create_teacher(spec: str, *, pretrained: bool = True, checkpoint: Optional[str] = None,
                   model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The distillation teacher: a model directory, ``hf-hub:`` id or timm name (the unconverted source)."""
    from .checkpoint import load_model
    from .convert import build_source_model

    kwargs = dict(model_kwargs or {})
    if not (spec.startswith("stvit_") or _is_path_like(spec)):
        # a source name such as deit_small (aliases understood)
        return build_source_model(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    model = load_model(spec, pretrained=pretrained and not checkpoint, **kwargs)
    if checkpoint:
        _load_weights(model, checkpoint)
    return model


def teacher_for(student: nn.Module, student_spec: str, teacher_spec: Optional[str] = None, *,
                pretrained: bool = True, checkpoint: Optional[str] = None,
                model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The teacher for distilling into ``student`` (built from ``student_spec``).

    ``teacher_spec`` defaults to the unconverted source when the student is a name converted on the fly
    (``deit_small`` -> DeiT-S with the same weights, checkpoint and constructor arguments); a model
    directory, ``hf-hub:`` id or ``stvit_*`` name has no source to fall back to, so it needs one.
    The teacher keeps its own head, which must predict the student's classes: a head reset to the
    student's classes would be random, and distilling from it would only add noise.
    """
    if teacher_spec is None:
        if student_spec.startswith("stvit_") or _is_path_like(student_spec):
            raise InvalidArgumentError("--distill needs --teacher (the unconverted source model)")
        teacher_spec = student_spec
    else:
        checkpoint = None  # --checkpoint belongs to the student's name, not to an explicit teacher
    kwargs = {k: v for k, v in (model_kwargs or {}).items() if k != "num_semantic_tokens"}
    teacher = create_teacher(teacher_spec, pretrained=pretrained, checkpoint=checkpoint, model_kwargs=kwargs)
    if getattr(teacher, "num_classes", None) != getattr(student, "num_classes", None):
        raise InvalidArgumentError(f"the teacher ({teacher_spec}) predicts {teacher.num_classes} classes, the student "
                                   f"{student.num_classes}: pass --teacher with a model trained on these classes")
    return teacher


def _load_weights(model: nn.Module, checkpoint: str) -> None:
    from .checkpoint import load_state_dict_file

    state_dict = load_state_dict_file(checkpoint)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not fit {architecture_of(model)}: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None


# ------------------------------------------------------------------------------------------------ loss

class DistillationLoss(nn.Module):
    """``(1 - alpha) * base + alpha * distill`` on the head output.

    soft: KL(student/tau || teacher/tau) * tau^2 (Hinton); hard: cross-entropy against the teacher's argmax
    (DeiT's hard distillation, here on the single head since STViT models have no distillation token).
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        base = self.base(outputs, targets)
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
        if self.kind == "soft":
            t = self.tau
            distill = F.kl_div(F.log_softmax(outputs / t, dim=-1), F.log_softmax(teacher_out.float() / t, dim=-1),
                               reduction="batchmean", log_target=True) * (t * t)
        else:
            distill = F.cross_entropy(outputs, teacher_out.argmax(dim=-1))
        return (1 - self.alpha) * base + self.alpha * distill


# ---------------------------------------------------------------------------------------------- eval

@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: DistInfo, *, amp: Optional[str] = None,
             num_classes: Optional[int] = None, progress: bool = False) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy and image count, summed over all ranks."""
    from tqdm import tqdm

    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    start = time.perf_counter()
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
            images = images.to(dist.device, non_blocking=True)
            targets = targets.to(dist.device, non_blocking=True)
            with _autocast(dist.device, amp):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            hits = top.eq(targets[:, None])
            correct1 += hits[:, :1].sum().item()
            correct5 += hits.any(dim=-1).sum().item()
            count += targets.numel()
    except DataError as e:
        stdata.reraise_loader_error(e)
    if dist.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    correct1, correct5, loss_sum, count = _all_reduce_sum([correct1, correct5, loss_sum, count], dist)
    if count == 0:
        raise DataError("no images to evaluate")
    return {
        "top1": 100.0 * correct1 / count,
        "top5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "images": int(count),
        "seconds": seconds,
        "img_per_sec": count / seconds if seconds > 0 else float("nan"),
    }


def _autocast(device: torch.device, amp: Optional[str]):
    if amp is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# -------------------------------------------------------------------------------------------- state

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


def _gather_rng(dist: DistInfo) -> List[Dict[str, Any]]:
    state = _rng_state()
    if not dist.distributed:
        return [state]
    gathered: List[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"resume checkpoint not found: {p}")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read resume checkpoint {p}: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "stvit-train" or "model" not in ckpt:
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


# ------------------------------------------------------------------------------------------ outputs

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "val_loss", "top1", "top5", "ema_top1", "ema_top5",
                 "epoch_seconds", "train_img_per_sec"]


def _write_metrics(out: Path, rows: List[Dict[str, Any]]) -> None:
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_bytes(out / "metrics.jsonl", jsonl.encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())


def plot_curves(rows: List[Dict[str, Any]], path: Path) -> bool:
    """Loss and top-1 per epoch as a PNG; returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    ax1.plot(epochs, [r["val_loss"] for r in rows], label="val loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [r["top1"] for r in rows], label="val top-1")
    if any(r.get("ema_top1") is not None for r in rows):
        ax2.plot(epochs, [r.get("ema_top1") for r in rows], label="EMA val top-1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("%")
    ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


class _StopSignal:
    """SIGINT/SIGTERM set a flag checked at the next optimizer step; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        import threading

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


# --------------------------------------------------------------------------------------------- train

def train(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    teacher: Optional[nn.Module] = None,
    resume: Optional[str] = None,
    force: bool = False,
    on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None,
    extra_config: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Fine-tune ``model`` on ``cfg.data`` (ImageFolder with train/ and val/), writing to ``cfg.output``.

    Returns the last epoch's metrics plus ``best_top1``, ``best_epoch`` and ``output``. Raises
    :class:`TrainingInterrupted` after saving a checkpoint when SIGINT/SIGTERM arrives.
    """
    dist = setup_distributed(cfg.device)
    out = Path(cfg.output)
    if not cfg.output:
        raise InvalidArgumentError("an output directory is required")
    if out.exists() and any(out.iterdir()) and not resume and not force:
        raise OutputExistsError(f"{out} already exists and is not empty (use --force, or --resume to continue)")
    if cfg.distill and teacher is None:
        raise InvalidArgumentError("distillation needs a teacher model (--teacher)")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    random.seed(cfg.seed + dist.rank)

    # data
    root = stdata.resolve_data_root(cfg.data)
    train_dir, val_dir = stdata.split_folder(root, "train"), stdata.split_folder(root, "val")
    if train_dir == val_dir:
        raise DataError(f"{root} needs 'train' and 'val' sub-folders (ImageNet layout)")
    data_config = stdata.model_data_config(model)
    train_tf = stdata.build_transform(data_config, training=True, auto_augment=cfg.aa, re_prob=cfg.reprob,
                                      scale=(cfg.scale_min, 1.0))
    eval_tf = stdata.build_transform(data_config, training=False)
    train_set = stdata.folder_dataset(train_dir, train_tf, seed=cfg.seed)
    val_set = stdata.folder_dataset(val_dir, eval_tf, class_names=train_set.class_to_idx)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None:
        stdata.check_num_classes(train_set, num_classes, exact=True)
    class_names = sorted(train_set.class_to_idx, key=train_set.class_to_idx.get)

    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=cfg.seed)
    batches_per_epoch = len(sampler) // cfg.batch_size
    if batches_per_epoch == 0:
        raise InvalidArgumentError(f"batch size {cfg.batch_size} is larger than the {len(sampler)} training "
                                   "images per process")
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.accum_steps)
    global_batch = cfg.batch_size * cfg.accum_steps * dist.world_size
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / cfg.base_batch

    # model, teacher, optimizer, scheduler, EMA, scaler
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    model = model.to(dist.device)
    if teacher is not None:
        teacher = teacher.to(dist.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    use_scaler = cfg.amp == "fp16" and dist.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    start_epoch, skip_batches, num_updates = 0, 0, 0
    meters = {"loss_sum": 0.0, "count": 0.0, "seconds": 0.0}
    best = {"top1": -1.0, "epoch": -1}
    rows: List[Dict[str, Any]] = []
    if resume:
        ckpt = load_training_checkpoint(resume)
        _check_same_model(ckpt, model, resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            if ckpt.get("ema") is None:
                raise CheckpointError(f"{resume} has no EMA weights; resume without --model-ema")
            ema.load_state_dict(ckpt["ema"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, skip_batches, num_updates = ckpt["epoch"], ckpt["batches_done"], ckpt["num_updates"]
        meters = dict(ckpt["meters"])
        best = dict(ckpt["best"])
        rows = [dict(r) for r in ckpt.get("rows", [])]
        rng = ckpt["rng"]
        if len(rng) != dist.world_size:
            _logger.warning("resuming with %d processes instead of %d: the run continues, but not bit for bit",
                            dist.world_size, len(rng))
        _set_rng_state(rng[dist.rank % len(rng)])

    arch = architecture_of(model)
    raw_model = model
    if dist.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=raw_model.num_classes)
        base_loss: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        base_loss = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        base_loss = nn.CrossEntropyLoss()
    distill_loss = DistillationLoss(base_loss, teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau) \
        if cfg.distill else None

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        _save_yaml(out / "config.yaml", {**dataclasses.asdict(cfg), "resolved_lr": lr, "global_batch": global_batch,
                                         "world_size": dist.world_size, "architecture": arch,
                                         "classes": class_names, "input_size": list(data_config["input_size"]),
                                         **dict(extra_config or {})})

    def save_state(epoch: int, batches_done: int, name: str = "last.pth") -> Path:
        rng = _gather_rng(dist)
        path = out / "checkpoints" / name
        if dist.is_main:
            state = {
                "format": "stvit-train", "version": CHECKPOINT_VERSION, "architecture": arch,
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch, "batches_done": batches_done, "num_updates": num_updates,
                "meters": dict(meters), "best": dict(best), "rows": rows, "rng": rng,
                "config": dataclasses.asdict(cfg),
            }
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(path, buf.getvalue())
        _barrier(dist)
        return path

    progress = not cfg.quiet and dist.is_main and sys.stderr.isatty()
    from tqdm import tqdm

    last_metrics: Dict[str, Any] = rows[-1] if rows else {}
    with _StopSignal() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            skip = skip_batches if epoch == start_epoch else 0
            if skip == 0:
                meters = {"loss_sum": 0.0, "count": 0.0, "seconds": 0.0}
            batch_sampler = _SkipBatches(torch.utils.data.BatchSampler(sampler, cfg.batch_size, drop_last=True), skip)
            loader = torch.utils.data.DataLoader(
                train_set, batch_sampler=batch_sampler, num_workers=cfg.workers,
                pin_memory=dist.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed + epoch),
            )
            model.train()
            bar = tqdm(total=batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            tick = time.perf_counter()
            try:
                for i, (images, targets) in enumerate(loader, start=skip):
                    images = images.to(dist.device, non_blocking=True)
                    targets = targets.to(dist.device, non_blocking=True)
                    if mixup_fn is not None:
                        images, targets = mixup_fn(images, targets)
                    last_in_step = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches_per_epoch
                    sync = nullcontext() if last_in_step or not dist.distributed else model.no_sync()
                    with sync:
                        with _autocast(dist.device, cfg.amp):
                            outputs = model(images)
                            if distill_loss is not None:
                                loss = distill_loss(images, outputs, targets)
                            else:
                                loss = base_loss(outputs, targets)
                        if not torch.isfinite(loss):
                            raise StvitError(f"loss is {loss.item()} at epoch {epoch + 1}, step {num_updates}; "
                                             "lower the learning rate or use bf16 instead of fp16")
                        scaled = loss / cfg.accum_steps
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    meters["loss_sum"] += loss.item() * images.shape[0]
                    meters["count"] += images.shape[0]
                    if not last_in_step:
                        continue
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    num_updates += 1
                    scheduler.step_update(num_updates=num_updates)
                    if ema is not None:
                        ema.update(raw_model, step=num_updates)
                    now = time.perf_counter()
                    meters["seconds"] += now - tick
                    tick = now
                    bar.update(i + 1 - bar.n)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{meters['count'] * dist.world_size / max(meters['seconds'], 1e-9):.0f}")
                    stop_now = stop.requested
                    if dist.distributed:
                        stop_now = _all_reduce_sum([float(stop_now)], dist)[0] > 0
                    if stop_now:
                        path = save_state(epoch, i + 1)
                        raise TrainingInterrupted(f"interrupted at epoch {epoch + 1}, step {num_updates}; "
                                                  f"checkpoint saved, continue with --resume {path}")
                    if cfg.checkpoint_every_steps and num_updates % cfg.checkpoint_every_steps == 0 \
                            and i + 1 < batches_per_epoch:
                        save_state(epoch, i + 1)
            except DataError as e:
                stdata.reraise_loader_error(e)
            finally:
                bar.close()

            loss_sum, count, seconds = _all_reduce_sum([meters["loss_sum"], meters["count"], meters["seconds"]], dist)
            metrics = evaluate(raw_model, eval_loader(val_set, cfg.batch_size, cfg.workers, dist), dist, amp=cfg.amp)
            row: Dict[str, Any] = {
                "epoch": epoch + 1, "step": num_updates, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / max(count, 1), "val_loss": metrics["loss"], "top1": metrics["top1"],
                "top5": metrics["top5"], "ema_top1": None, "ema_top5": None,
                "epoch_seconds": seconds / dist.world_size, "train_img_per_sec": count / max(seconds / dist.world_size, 1e-9),
            }
            if ema is not None:
                ema_metrics = evaluate(ema.module, eval_loader(val_set, cfg.batch_size, cfg.workers, dist), dist,
                                       amp=cfg.amp)
                row["ema_top1"], row["ema_top5"] = ema_metrics["top1"], ema_metrics["top5"]
            rows.append(row)
            last_metrics = row
            is_best = row["top1"] > best["top1"]
            if is_best:
                best = {"top1": row["top1"], "epoch": epoch + 1}
            if dist.is_main:
                _write_metrics(out, rows)
                if is_best:
                    export_model(raw_model, out / "best", class_names=class_names, data_config=data_config,
                                 metadata={"top1": row["top1"], "top5": row["top5"], "epoch": epoch + 1,
                                           "dataset": str(root), "images": metrics["images"]})
            meters = {"loss_sum": 0.0, "count": 0.0, "seconds": 0.0}
            save_state(epoch + 1, 0)
            if is_best and dist.is_main:
                import shutil

                shutil.copyfile(out / "checkpoints" / "last.pth", out / "checkpoints" / ".best.tmp")
                os.replace(out / "checkpoints" / ".best.tmp", out / "checkpoints" / "best.pth")
            if on_epoch_end is not None and dist.is_main:
                on_epoch_end(row)

    if dist.is_main and rows:
        plot_curves(rows, out / "curves.png")
    _barrier(dist)
    return {**last_metrics, "best_top1": best["top1"], "best_epoch": best["epoch"], "output": str(out),
            "world_size": dist.world_size, "classes": len(class_names)}


def export_model(model: nn.Module, directory: Path, *, class_names: List[str], data_config: Mapping[str, Any],
                 metadata: Mapping[str, Any]) -> Path:
    """Save in the ``stvit convert`` format, recording class names and the preprocessing used."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(num_classes=len(class_names), label_names=list(class_names),
               mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
               crop_pct=data_config.get("crop_pct", cfg.get("crop_pct")),
               interpolation=data_config.get("interpolation", cfg.get("interpolation")))
    model.pretrained_cfg = cfg
    # the head may have been reset after the model recorded its constructor arguments
    return save_model(model, directory, force=True, metadata={"finetuned": dict(metadata)},
                      model_args={"num_classes": model.num_classes})


def _save_yaml(path: Path, values: Mapping[str, Any]) -> None:
    import yaml

    atomic_write_bytes(path, yaml.safe_dump(dict(values), sort_keys=False).encode())
