"""The models a fine-tune runs: the student with its provenance, the distillation teacher, the distillation loss.

The student comes from a model directory or ``hf-hub:`` id (its config.json's ``stvit`` record is kept), an
``stvit_*`` name (built directly), or a timm DeiT/ViT/Swin name converted on the fly as ``stvit convert``
does (and recorded as it does, with :func:`stvit_core.convert.conversion_metadata`). The record is left on
the model as ``model.stvit_metadata``, which :func:`stvit_core.train.train` writes into ``best/config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import names_a_saved_model
from .errors import CheckpointError, InvalidArgumentError, StvitError

__all__ = ["DistillationLoss", "architecture_of", "create_model_for_training", "create_teacher", "teacher_for"]


def architecture_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _check_token_options(spec: str, tokens: Optional[int], tokens_per_window: Optional[int]) -> None:
    """Token counts are chosen when a name is built or converted; anywhere else they cannot apply."""
    from .convert import SOURCE_ALIASES

    if tokens is None and tokens_per_window is None:
        return
    option = "--tokens" if tokens is not None else "--tokens-per-window"
    if names_a_saved_model(spec):
        raise InvalidArgumentError(f"{option} applies when MODEL is a model name; {spec} is a model whose tokens "
                                   f"are fixed (convert its source again with {option} N to change them)")
    is_swin = "swin" in SOURCE_ALIASES.get(spec, spec)
    if is_swin and tokens is not None:
        raise InvalidArgumentError("--tokens is for DeiT/ViT; Swin takes --tokens-per-window (tokens per window)")
    if not is_swin and tokens_per_window is not None:
        raise InvalidArgumentError("--tokens-per-window is for Swin; use --tokens for DeiT/ViT")


def _check_weight_options(spec: str, pretrained: bool, checkpoint: Optional[str]) -> None:
    """Where the weights come from: a saved model has its own; a name takes one of pretrained, file or random."""
    if checkpoint and not pretrained:
        raise InvalidArgumentError("--checkpoint and --no-pretrained exclude each other")
    if names_a_saved_model(spec):
        if not pretrained:  # load_model(DIR, pretrained=False) would throw its weights away
            raise InvalidArgumentError(f"--no-pretrained applies to model names only; {spec} is a saved model with "
                                       "its own weights")
        if checkpoint:
            raise InvalidArgumentError(f"--checkpoint applies to model names only; {spec} is a saved model with "
                                       "its own weights")


def create_model_for_training(
    spec: str,
    *,
    tokens: Optional[int] = None,
    tokens_per_window: Optional[int] = None,
    pretrained: bool = True,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
    drop_path: Optional[float] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Build the model to fine-tune from a model directory, ``hf-hub:`` id, or a name.

    A name of a plain timm model (``deit_small``, ``swin_tiny``...) is converted on the fly to STViT with
    ``tokens`` semantic tokens (16 by default; Swin: ``tokens_per_window``, 9 by default); an ``stvit_*`` name
    is built directly. A token count for a directory or Hub model, or the wrong kind for the family, is an
    error, and so are ``pretrained=False`` or a ``checkpoint`` for a directory or Hub model (it has its own
    weights) and ``checkpoint`` with ``pretrained=False``. ``num_classes`` resets the head when it differs
    from the checkpoint's. The model's provenance is left in ``model.stvit_metadata``.
    """
    _check_token_options(spec, tokens, tokens_per_window)
    _check_weight_options(spec, pretrained, checkpoint)
    try:
        model, metadata = _create_model_for_training(
            spec, tokens=tokens, tokens_per_window=tokens_per_window, pretrained=pretrained, checkpoint=checkpoint,
            num_classes=num_classes, drop_path=drop_path, model_kwargs=model_kwargs)
    except StvitError:  # already one line about what the user gave (an unknown name, a missing file...)
        raise
    except (AssertionError, TypeError, ValueError) as e:  # timm constructors reject bad --model-arg values so
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgumentError(f"cannot build {spec} with {dict(model_kwargs or {})}: {msg}") from None
    model.stvit_metadata = metadata
    return model


def _create_model_for_training(spec: str, *, tokens: Optional[int], tokens_per_window: Optional[int],
                               pretrained: bool, checkpoint: Optional[str], num_classes: Optional[int],
                               drop_path: Optional[float], model_kwargs: Optional[Mapping[str, Any]]):
    from .checkpoint import load_model
    from .convert import conversion_metadata, convert_pair, resolve_source_name

    kwargs: Dict[str, Any] = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if names_a_saved_model(spec):  # its own weights (_check_weight_options refused any others)
        return load_model(spec, **kwargs), _recorded_metadata(spec)
    if spec.startswith("stvit_"):
        tokens_arg = "semantic_tokens_per_window" if tokens_per_window is not None else "num_semantic_tokens"
        if tokens is not None or tokens_per_window is not None:
            kwargs[tokens_arg] = tokens if tokens is not None else tokens_per_window
        model = load_model(spec, pretrained=pretrained and not checkpoint, **kwargs)
        if checkpoint:
            _load_weights(model, checkpoint)
        return model, {}
    # The source keeps its own head (its checkpoint's, or --model-arg num_classes) so its weights load
    # strictly; --num-classes resets the converted model's head after.
    source_kwargs = {k: v for k, v in (model_kwargs or {}).items() if k != "drop_path_rate"}
    stvit_kwargs: Dict[str, Any] = {"drop_path_rate": drop_path} if drop_path is not None else {}
    if tokens_per_window is not None:
        stvit_kwargs["semantic_tokens_per_window"] = tokens_per_window
    source_name = resolve_source_name(spec)
    source, model = convert_pair(source_name, num_semantic_tokens=16 if tokens is None else tokens,
                                 pretrained=pretrained, checkpoint=checkpoint, source_kwargs=source_kwargs,
                                 **stvit_kwargs)
    metadata = conversion_metadata(source, model, source_name=source_name)
    metadata["source_weights"] = str(checkpoint) if checkpoint else (f"timm/{source_name}" if pretrained else "random")
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": num_classes}
    return model, metadata


def _recorded_metadata(spec: str) -> Dict[str, Any]:
    """The ``stvit`` record of a model directory's or Hub repo's config.json ({} when it has none)."""
    import json

    try:
        if spec.startswith("hf-hub:"):
            from huggingface_hub import hf_hub_download

            from .hub import split_repo_spec

            repo_id, revision = split_repo_spec(spec)
            path = hf_hub_download(repo_id, "config.json", revision=revision)
            config = json.loads(Path(path).read_text())
        else:
            from .checkpoint import read_config

            config = read_config(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec)
    except Exception:  # the model itself loaded: provenance is informative, never a reason to stop
        return {}
    record = config.get("stvit")
    return dict(record) if isinstance(record, dict) else {}


def create_teacher(spec: str, *, pretrained: bool = True, checkpoint: Optional[str] = None,
                   model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The distillation teacher: a model directory, ``hf-hub:`` id or timm name (the unconverted source)."""
    from .checkpoint import load_model
    from .convert import build_source_model

    kwargs = dict(model_kwargs or {})
    if not (spec.startswith("stvit_") or names_a_saved_model(spec)):
        # a source name such as deit_small (aliases understood)
        return build_source_model(spec, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    # a saved model keeps its own weights: --no-pretrained (random weights for a name) cannot apply to it
    model = load_model(spec, pretrained=(pretrained or names_a_saved_model(spec)) and not checkpoint, **kwargs)
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
        if student_spec.startswith("stvit_") or names_a_saved_model(student_spec):
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
