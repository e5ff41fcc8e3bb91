"""The patch embedding's projection, computed on CUDA as one matrix product.

A ViT or Swin patch embedding is a convolution whose kernel equals its stride: each output pixel is one
``C*kh*kw`` patch times the weight. On CUDA, cuDNN runs this convolution far below the GPU's matrix rate (on an
H200 with bf16 autocast, ~1 ms of a 7 ms STViT-DeiT-S batch of 256, with ``cudnn.benchmark`` on; see
docs/benchmarks.md, "GPU suite"), while the same arithmetic as a patch gather and one GEMM takes a fraction of
that. :class:`PatchProjection` is that GEMM, behind the ``nn.Conv2d`` interface and state dict, so checkpoints,
timm's ``PatchEmbed`` and conversion code see the same module. Elsewhere (CPU, ONNX export on CPU) it is the
convolution, bit for bit.

It is an opt-in speed step, never part of a model's construction: :func:`use_patch_gemm` applies it to any timm
model with a ``PatchEmbed`` (ViT, DeiT, Swin, STViT), so a comparison gives the base and the STViT model the same
patch embedding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import register_notrace_function

__all__ = ["PatchProjection", "use_patch_gemm", "use_patch_projection"]


class PatchProjection(nn.Conv2d):
    """``nn.Conv2d`` with ``kernel_size == stride`` (no padding, dilation or groups) that runs as a GEMM on CUDA.

    Output: the convolution's ``(B, D, H // kh, W // kw)``, returned as a permuted view of a channels-last
    result, so timm's ``flatten(2).transpose(1, 2)`` (ViT) or NHWC permute (Swin) after it costs no copy.
    ``gemm_devices``: the device types that take the GEMM (a test sets ``("cpu",)`` to run it without a GPU).
    """

    gemm_devices = ("cuda",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.patchifies(self):
            raise ValueError("PatchProjection needs kernel_size == stride, no padding, dilation 1 and groups 1")

    @staticmethod
    def patchifies(conv: nn.Conv2d) -> bool:
        """Whether ``conv`` cuts its input into non-overlapping patches (what the GEMM computes)."""
        return (conv.kernel_size == conv.stride and not any(conv.padding) and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.padding_mode == "zeros")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PatchProjection":
        """The same parameters (shared, not copied) behind a :class:`PatchProjection`; no random draw."""
        proj = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                   bias=conv.bias is not None, device="meta")
        proj.weight = conv.weight
        proj.bias = conv.bias
        return proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project_patches(x, self.weight, self.bias, self.kernel_size, self.gemm_devices)


@torch.fx.wrap  # plain torch.fx.symbolic_trace too
@register_notrace_function  # reason: branches on the input's device
def _project_patches(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: Tuple[int, int],
                     gemm_devices: Tuple[str, ...]) -> torch.Tensor:
    if x.device.type not in gemm_devices:
        return F.conv2d(x, weight, bias, stride=kernel_size)  # nn.Conv2d's own call for this configuration
    B, C, H, W = x.shape
    kh, kw = kernel_size
    gh, gw = H // kh, W // kw
    x = x[:, :, :gh * kh, :gw * kw]  # an unpadded convolution drops the remainder rows and columns
    patches = x.reshape(B, C, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh, gw, C * kh * kw)
    return F.linear(patches, weight.flatten(1), bias).permute(0, 3, 1, 2)


def use_patch_projection(patch_embed: nn.Module) -> Optional[PatchProjection]:
    """Swap ``patch_embed.proj`` for a :class:`PatchProjection` when it is a plain patchifying ``nn.Conv2d``.

    Returns the new projection, or ``None`` where the projection is something else (a hybrid stem, overlapping
    patches), which is then left as it is.
    """
    conv = getattr(patch_embed, "proj", None)
    if type(conv) is not nn.Conv2d or not PatchProjection.patchifies(conv):
        return None
    patch_embed.proj = PatchProjection.from_conv(conv)
    return patch_embed.proj


def use_patch_gemm(model: nn.Module) -> int:
    """Give every timm ``PatchEmbed`` in ``model`` a :class:`PatchProjection` (in place; parameters and state dict
    unchanged). Works on any timm ViT / DeiT / Swin and on the STViT models alike. Returns how many projections
    were swapped (0: no plain patchifying patch embedding, e.g. STViT-R-Swin's convolutional stem)."""
    return sum(use_patch_projection(m) is not None for m in model.modules() if isinstance(m, PatchEmbed))
