"""The files of a fine-tuning run's output directory (written by rank 0 only, each atomically).

``config.yaml`` (the resolved options and the model that ran), ``metrics.csv`` (timm's summary.csv columns)
and ``metrics.jsonl`` (one row per epoch), ``curves.png`` (with matplotlib), ``checkpoints/`` (see
:mod:`stvit_core.train_state`), and ``best/``: the best model in the ``stvit convert`` format, its
provenance and fine-tuning record under config.json's ``stvit`` key, and its evaluation in ``results.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

try:  # flock: POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import torch.nn as nn
import yaml
from timm.models import get_model_args
from timm.utils import update_summary

from .checkpoint import save_model
from .distributed import DistInfo
from .errors import InvalidArgumentError, OutputExistsError, StvitError
from .files import atomic_write_bytes

__all__ = ["check_output_dir", "export_model", "model_record", "output_directory", "plot_curves", "write_metrics",
           "write_yaml"]

# What a run leaves before its first checkpoint: a directory holding only these is not a run to protect.
_LEFT_BEFORE_FIRST_CHECKPOINT = ("config.yaml", "checkpoints")


def _holds_a_run(out: Path) -> bool:
    """Whether ``out`` holds anything but our config.yaml and a checkpoints/ folder without a checkpoint."""
    for path in out.iterdir():
        if path.name not in _LEFT_BEFORE_FIRST_CHECKPOINT:
            return True
        if path.is_dir() and any(path.glob("*.pth")):
            return True
    return False


def check_output_dir(output: str, *, resume: bool, force: bool) -> Path:
    """The output directory, refused when it holds another run (unless resuming or forced) or another run is
    writing it now."""
    if not output:
        raise InvalidArgumentError("an output directory is required")
    out = Path(output)
    if os.path.lexists(out) and not out.is_dir():  # a dangling symbolic link too
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and not resume and not force and _holds_a_run(out):
        raise OutputExistsError(_another_run(out))
    if out.is_dir():
        with _run_lock(out, resume=resume, force=force):  # a run writing it now: fail before any slow work
            pass
    return out


def _another_run(out: Path) -> str:
    return f"{out} already exists and is not empty (use --force, or --resume to continue)"


@contextlib.contextmanager
def _run_lock(out: Path, *, resume: bool, force: bool) -> Iterator[None]:
    """Hold an exclusive lock on the ``out`` folder itself (no lock file is left behind), so that of two runs
    writing one output directory exactly one goes on; the other fails at once. Released when the process ends,
    however it ends. Where there is no ``flock`` (Windows) runs are not locked."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise StvitError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            # what a second run hears when it comes after the first; --force cannot take over a live run
            raise OutputExistsError(f"{out} is being written by another run (wait for it to end, or choose another "
                                    "output directory)" if resume or force else _another_run(out)) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_directory(out: Path, dist: DistInfo, *, resume: Optional[bool] = None, force: bool = False) -> Iterator[Path]:
    """Create ``out/checkpoints`` (rank 0) and hold ``out`` for this run; if the run fails before its first
    checkpoint, remove what it created.

    ``out`` is locked while the run writes it: a second run into it fails at once with OutputExistsError.
    Given ``resume`` (and ``force``), whether ``out`` holds another run is checked again under the lock, for a
    run that finished between :func:`check_output_dir` and this point.
    """
    if not dist.is_main:
        yield out
        return
    missing = [p for p in (out, *out.parents) if not os.path.lexists(p)]
    created = missing[-1] if missing else None
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise StvitError(f"cannot create output directory {out}: {e.strerror or e}") from None
    with _run_lock(out, resume=bool(resume), force=force):  # before anything of ours could be removed
        if resume is not None and not resume and not force and _holds_a_run(out):
            raise OutputExistsError(_another_run(out))
        try:
            yield out
        except BaseException:
            if created is not None and not any((out / "checkpoints").glob("*.pth")):
                shutil.rmtree(created, ignore_errors=True)
            raise


def write_yaml(path: Path, values: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, yaml.safe_dump(dict(values), sort_keys=False).encode())


def model_record(model: nn.Module) -> Dict[str, Any]:
    """The model that runs, for config.yaml: architecture, tokens, classes and constructor arguments."""

    record: Dict[str, Any] = {"architecture": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
                              "num_classes": getattr(model, "num_classes", None)}
    for name in ("num_semantic_tokens", "semantic_tokens_per_window"):
        if getattr(model, name, None) is not None:
            record[name] = getattr(model, name)
    record["model_args"] = json.loads(json.dumps(get_model_args(model)))  # tuples -> lists, for YAML
    return record


def write_metrics(out: Path, rows: List[Dict[str, Any]]) -> None:
    """metrics.jsonl (the rows as they are) and metrics.csv (timm's summary.csv layout), rewritten whole."""

    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    # update_summary appends in place; written into a scratch file and renamed, a crash never leaves half a
    # row, and a resumed run's file holds exactly the checkpoint's rows
    with tempfile.TemporaryDirectory() as scratch:
        csv_path = Path(scratch) / "metrics.csv"
        for r in rows:
            update_summary(
                r["epoch"],
                {"loss": r["train_loss"], "step": r["step"], "seconds": r["epoch_seconds"],
                 "img_per_sec": r["train_img_per_sec"]},
                {k: r[f"{p}{k}"] for p, k in (("val_", "loss"), ("", "top1"), ("", "top5"), ("", "ema_top1"),
                                              ("", "ema_top5"))},
                csv_path, lr=r["lr"], write_header=r is rows[0])
        atomic_write_bytes(out / "metrics.csv", csv_path.read_bytes())


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


def export_model(model: nn.Module, directory: Path, *, class_names: List[str], data_config: Mapping[str, Any],
                 metadata: Mapping[str, Any], results: Optional[Mapping[str, Any]] = None) -> Path:
    """Save in the ``stvit convert`` format, recording class names and the preprocessing used.

    ``metadata`` goes under config.json's ``stvit`` key; ``results`` (the model's evaluation) into
    ``results.json`` beside it, where model cards look for it (:func:`stvit_core.hub.read_eval_results`).
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(num_classes=len(class_names), label_names=list(class_names),
               mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
               crop_pct=data_config.get("crop_pct", cfg.get("crop_pct")),
               interpolation=data_config.get("interpolation", cfg.get("interpolation")))
    model.pretrained_cfg = cfg
    # the head may have been reset after the model recorded its constructor arguments
    save_model(model, directory, force=True, metadata=dict(metadata), model_args={"num_classes": model.num_classes})
    if results is not None:
        atomic_write_bytes(Path(directory) / "results.json", json.dumps(dict(results), indent=2).encode())
    return Path(directory)
