"""Semantic segmentation with STViT-R encoders: segmentation-models-pytorch's decoders over timm feature maps.

STViT-R-Swin needs nothing from this module: its four maps at strides 4, 8, 16 and 32 are what
segmentation-models-pytorch (smp) takes from any timm model, so ``smp.UPerNet(encoder_name="tu-stvit_r_swin_small_
patch4_window7_224", encoder_weights=None, classes=150, dynamic_img_size=True)`` is a UPerNet on STViT-R-Swin.

What does not fit smp, and is here:

- STViT-R on DeiT/ViT (and any plain ViT) ends on one stride-16 map, which smp refuses ("Unsupported model
  downsampling pattern"): :class:`SimpleFeaturePyramid` (ViTDet's neck) makes maps at strides 4, 8, 16 and 32 of
  it, and :class:`PyramidEncoder` hands them to smp's decoders as smp's own timm encoder hands Swin's.
- An STViT (non-R) model has no full-resolution map after its semantic layers: :func:`create_segmentation_model`
  refuses it in one line instead of building a decoder over its early blocks.
- smp takes its encoders by name; :func:`create_segmentation_model` builds any of its architectures on either kind
  of encoder from a timm name, with the model's pretrained weights on request.

:class:`PastedObjectsSegmentation` is the pasted-objects set of :mod:`stvit_core.detection_data` as per-pixel class
masks; :func:`train_segmentation` and :func:`evaluate_segmentation` train with smp's losses and report mIoU with
smp's metrics (``pip install 'stvit[segmentation]'``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from .detection_data import PastedObjectsDataset
from .errors import InvalidArgumentError, StvitError, require_extra
from .models.deit import SemanticVisionTransformer

__all__ = [
    "PastedObjectsSegmentation", "PyramidEncoder", "SimpleFeaturePyramid", "create_segmentation_model",
    "evaluate_segmentation", "train_segmentation",
]

SEGMENTATION_MODULES = ("segmentation_models_pytorch",)
_PYRAMID = [4, 8, 16, 32]  # the strides smp's decoders read (its timm encoder's "transformer style")


def _require_smp():
    require_extra("segmentation", SEGMENTATION_MODULES, "semantic segmentation")
    import segmentation_models_pytorch as smp

    return smp


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., 2022): maps at strides 4, 8, 16 and 32 from one stride-16 map
    of ``dim`` channels, by two 2x transposed convolutions (with LayerNorm and GELU between), one, none, and a 2x
    max pooling. Returns ``dim / 4, dim / 2, dim, dim`` channels, as ViTDet before its output convolutions (the
    decoders project every level themselves)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)
        self.channels = [dim // 4, dim // 2, dim, dim]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [self.up4(x), self.up2(x), x, self.down2(x)]


class PyramidEncoder(nn.Module):
    """An smp encoder on a timm model's last stride-16 map plus a :class:`SimpleFeaturePyramid`.

    It has what smp's models read from an encoder (``out_channels``, ``output_stride``, ``set_in_channels``) and
    returns what smp's timm encoder returns for Swin: the input, an empty stride-2 map, then the maps at strides
    4 to 32 (``depth`` + 1 in all).
    """

    _is_torch_scriptable = False
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(self, name: str, *, pretrained: bool = False, in_chans: int = 3, depth: int = 5,
                 output_stride: int = 32, model_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        if not 3 <= depth <= 5 or output_stride != 32:
            raise InvalidArgumentError(f"a ViT encoder takes depth 3-5 and output_stride 32, got {depth} and "
                                       f"{output_stride}")
        self.model = timm.create_model(name, pretrained=pretrained, features_only=True, feature_cls="getter",
                                       out_indices=(-1,), in_chans=in_chans, **dict(model_kwargs or {}))
        dim = self.model.feature_info.channels()[-1]
        self.neck = SimpleFeaturePyramid(dim)
        self._in_channels, self._depth = in_chans, depth
        self._out_channels = [in_chans, 0] + self.neck.channels

    @property
    def out_channels(self) -> List[int]:
        return self._out_channels[: self._depth + 1]

    @property
    def output_stride(self) -> int:
        return 2 ** self._depth

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        if in_channels != self._in_channels:  # the timm model was built with in_chans already
            raise InvalidArgumentError(f"this encoder was built for {self._in_channels} input channels")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = self.neck(self.model(x)[-1])
        empty = x.new_empty((x.shape[0], 0, x.shape[2] // 2, x.shape[3] // 2))
        return [x, empty, *maps][: self._depth + 1]


def _encoder_kind(name: str, model_kwargs: Mapping[str, Any]) -> Tuple[str, bool]:
    """``'pyramid'`` (strides 4-32: smp's own timm encoder) or ``'plain'`` (stride 16 only: a ViT), and whether
    the model takes ``dynamic_img_size``; a one-line error for anything else."""
    try:
        with torch.device("meta"):
            features = timm.create_model(name, features_only=True, feature_cls="getter", **model_kwargs)
    except (RuntimeError, ValueError, TypeError) as e:  # the model's own argument checks
        raise InvalidArgumentError(f"cannot build {name!r} as a segmentation encoder: {e}") from e
    if isinstance(features.model, SemanticVisionTransformer):
        raise InvalidArgumentError(
            f"{name} is an STViT model: its semantic layers keep a few tokens, not a map, so it cannot be a "
            "segmentation encoder; use its STViT-R version (stvit_r_*), which recovers the full-resolution map")
    reductions = list(features.feature_info.reduction())
    any_size = hasattr(features.model, "dynamic_img_size")
    if reductions[-len(_PYRAMID):] == _PYRAMID:  # Swin's 4-32; CNNs' 2-32 (smp takes both)
        return "pyramid", any_size
    if set(reductions) == {16}:
        return "plain", any_size
    raise InvalidArgumentError(f"{name} gives maps at strides {reductions}; a segmentation encoder needs strides "
                               "4, 8, 16 and 32 (Swin, CNNs) or one stride-16 map (ViT)")


def create_segmentation_model(
    arch: str,
    encoder: str,
    classes: int,
    *,
    pretrained: bool = False,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    **smp_kwargs: Any,
) -> nn.Module:
    """An smp segmentation model (``'UPerNet'``, ``'FPN'``, ``'Unet'``... as ``smp.create_model`` names them) on
    the timm model ``encoder``.

    Args:
        arch: the smp architecture.
        encoder: a timm name (``'stvit_r_swin_small_patch4_window7_224'``, ``'stvit_r_deit_small_patch16_224'``,
            ``'swin_small_patch4_window7_224'``, ``'local-dir:DIR'``...). Models with maps at strides 4-32 (Swin,
            CNNs) are smp's ``tu-`` encoders as they are; models with one stride-16 map (STViT-R-DeiT, ViT) get a
            :class:`PyramidEncoder`. STViT (non-R) models are refused.
        classes: output channels (classes, background included).
        pretrained: the encoder's pretrained weights through timm (the release's ImageNet weights for
            STViT-R-Swin-S/B, converted DeiT weights for STViT-R-DeiT); what smp calls ``encoder_weights``.
        model_kwargs: arguments for ``timm.create_model`` (``layout='detection'``, ``embed_dim``...). Without
            ``img_size`` or ``dynamic_img_size``, a model that takes ``dynamic_img_size`` (ViT, Swin) is built with
            it: any input whose sides are multiples of 32.
        smp_kwargs: the architecture's own arguments (``decoder_channels``, ``encoder_depth``, ``in_channels``...).
    """
    smp = _require_smp()
    model_kwargs = dict(model_kwargs or {})
    kind, any_size = _encoder_kind(encoder, model_kwargs)
    if any_size and "img_size" not in model_kwargs and "dynamic_img_size" not in model_kwargs:
        model_kwargs["dynamic_img_size"] = True  # transformers are built for one size unless told otherwise
    if kind == "pyramid":
        return smp.create_model(arch, encoder_name=f"tu-{encoder}", encoder_weights=True if pretrained else None,
                                classes=classes, **smp_kwargs, **model_kwargs)
    # smp takes non-timm encoders from its registry only: an entry for this one call (smp copies its params)
    key = f"stvit-pyramid:{encoder}"
    smp.encoders.encoders[key] = {
        "encoder": PyramidEncoder, "pretrained_settings": {},
        "params": dict(name=encoder, pretrained=pretrained, in_chans=smp_kwargs.get("in_channels", 3),
                       model_kwargs=model_kwargs),
    }
    try:
        return smp.create_model(arch, encoder_name=key, encoder_weights=None, classes=classes, **smp_kwargs)
    finally:
        del smp.encoders.encoders[key]


class PastedObjectsSegmentation(torch.utils.data.Dataset):
    """:class:`~stvit_core.detection_data.PastedObjectsDataset` as semantic segmentation: ``(image, mask)`` with
    ``image`` a normalised float tensor ``(3, H, W)`` and ``mask`` an int64 ``(H, W)`` map of classes (0: background,
    ``i``: the ``i``-th of ``classes``; an item pasted later covers an earlier one). ``split='val'`` pastes the
    held-out Fashion-MNIST items. Every image is ``image_size`` square by default, so items batch; the other
    arguments are those of ``PastedObjectsDataset``."""

    def __init__(self, split: str = "train", num_images: int = 256, image_size: "int | Tuple[int, int]" = 128,
                 *, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 **kwargs: Any) -> None:
        self.objects = PastedObjectsDataset(split, num_images, image_size, **kwargs)
        self.classes = ["background"] + self.objects.classes
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, target = self.objects[index]
        mask = torch.zeros(image.shape[1:], dtype=torch.int64)
        for item_mask, label in zip(target["masks"], target["labels"]):
            mask[item_mask.bool()] = label
        return (image - self.mean) / self.std, mask


def train_segmentation(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    seed: int = 0,
    num_workers: int = 0,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> List[float]:
    """Train ``model`` for ``steps`` AdamW steps on ``(image, mask)`` batches with cross-entropy plus smp's Dice
    loss; the learning rate warms up for ``warmup_steps`` and follows a cosine to zero (timm's optimizer factory
    and scheduler, per step). Shuffling is seeded; the caller's random state is left untouched. Returns every
    step's loss; ``on_step(step, loss)`` is called after each."""
    smp = _require_smp()
    if steps < 1 or batch_size < 1:
        raise InvalidArgumentError("steps and batch_size must be positive")
    device = next(model.parameters()).device
    dice = smp.losses.DiceLoss("multiclass")
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)
    scheduler = CosineLRScheduler(opt, t_initial=steps, warmup_t=warmup_steps, warmup_lr_init=lr * 1e-3,
                                  warmup_prefix=True, t_in_epochs=False)
    history: List[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                             num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
        model.train()
        while len(history) < steps:
            for images, masks in loader:
                images, masks = images.to(device), masks.to(device)
                logits = model(images)
                loss = F.cross_entropy(logits, masks) + dice(logits, masks)
                if not math.isfinite(loss.item()):
                    raise StvitError(f"the segmentation loss is {loss.item()} at step {len(history)}; lower the lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(loss.item())
                scheduler.step_update(len(history))
                if on_step is not None:
                    on_step(len(history), history[-1])
                if len(history) == steps:
                    break
    return history


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: torch.utils.data.Dataset, *,
                          batch_size: int = 8) -> Dict[str, Any]:
    """Mean IoU over classes (``miou``; each class's pixels summed over the whole set first, smp's ``macro``
    reduction, background included), ``iou`` per class and ``pixel_accuracy`` of ``model`` on ``dataset``. A
    class absent from both the masks and the predictions scores 1 (smp's convention)."""
    smp = _require_smp()
    device = next(model.parameters()).device
    num_classes = dataset.num_classes
    was_training = model.training
    model.eval()
    stats = []
    try:
        for images, masks in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            pred = model(images.to(device)).argmax(1).cpu()
            stats.append(smp.metrics.get_stats(pred, masks, mode="multiclass", num_classes=num_classes))
    finally:
        model.train(was_training)
    tp, fp, fn, tn = (torch.cat(s) for s in zip(*stats))
    per_class = smp.metrics.iou_score(tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0))
    return {
        "miou": float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="macro")),
        "iou": [float(v) for v in per_class],
        "pixel_accuracy": float(tp.sum() / (tp.sum() + fn.sum())),
    }
