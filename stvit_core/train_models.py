"""Distillation for fine-tuning: the teacher (the unconverted source by default) and the distillation loss.

The student comes from :func:`stvit_core.load_model` like every model (``convert=True``: a source name is
converted on the fly, and its provenance is left in ``model.stvit_metadata``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import names_a_saved_model
from .errors import InvalidArgumentError
from .loading import load_model

__all__ = ["DistillationLoss", "teacher_for"]


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
    # a saved teacher keeps its own weights: --no-pretrained (random weights for the student's name) is not its
    teacher = load_model(teacher_spec, pretrained=pretrained or names_a_saved_model(teacher_spec),
                         checkpoint=checkpoint, **kwargs)
    if getattr(teacher, "num_classes", None) != getattr(student, "num_classes", None):
        raise InvalidArgumentError(f"the teacher ({teacher_spec}) predicts {teacher.num_classes} classes, the student "
                                   f"{student.num_classes}: pass --teacher with a model trained on these classes")
    return teacher


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
