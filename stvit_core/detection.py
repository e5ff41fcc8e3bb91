"""Object detection with STViT-R backbones: torchvision's Faster R-CNN / Mask R-CNN over timm feature maps.

:func:`build_detector` turns any timm model with a feature API (every STViT-R model, timm's Swin and ViT...)
into a torchvision detector: timm's ``features_only`` maps (NCHW, via ``forward_intermediates``) feed
torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`, whose levels feed torchvision's RPN
(:class:`~torchvision.models.detection.anchor_utils.AnchorGenerator`) and RoI heads
(:class:`~torchvision.ops.MultiScaleRoIAlign`). Images are resized and batched by torchvision's
``GeneralizedRCNNTransform``, which pads each batch to its largest image (rounded up to 32, torchvision's
default; the STViT-R models take any size).

:func:`train_detector` trains one with torchvision's conventions (the model's loss dict, summed), using timm's
optimizer and scheduler factories; :func:`evaluate_detector` reports COCO box mAP with pycocotools
(``pip install stvit[detection]``).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.utils.data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import FeatureInfo
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .detection_data import detection_collate
from .errors import InvalidArgumentError, StvitError

__all__ = [
    "FeaturePyramidBackbone", "IntermediateFeatures", "build_detector", "coco_box_map", "evaluate_detector",
    "feature_backbone", "train_detector",
]

DETECTOR_KINDS = ("faster_rcnn", "mask_rcnn")


class IntermediateFeatures(nn.Module):
    """NCHW feature maps of a built timm model through its ``forward_intermediates`` (what timm's
    ``features_only=True, feature_cls='getter'`` builds from a name): ``prune_intermediate_layers`` drops what
    the maps do not need (head, final norm, later blocks) in place; ``feature_info`` lists the maps returned."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int]) -> None:
        super().__init__()
        if hasattr(model, "prune_intermediate_layers"):
            out_indices = model.prune_intermediate_layers(list(out_indices), prune_norm=True)
        self.model = model
        self.out_indices = tuple(out_indices)
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), output_fmt="NCHW",
                                                intermediates_only=True)


def _is_nchw_feature_net(model: nn.Module) -> bool:
    """A feature net that returns NCHW maps from ``forward_intermediates`` (timm's getter, or ours)."""
    inner = getattr(model, "model", None)
    return (isinstance(getattr(model, "feature_info", None), FeatureInfo) and inner is not None
            and hasattr(inner, "forward_intermediates") and str(getattr(model, "output_fmt", "NCHW")).endswith("NCHW"))


class FeaturePyramidBackbone(nn.Module):
    """timm feature maps -> torchvision FPN, with torchvision's ``BackboneWithFPN`` interface (``body``, ``fpn``,
    ``out_channels``; forward returns an ordered dict of levels ``'0'``, ``'1'``... and ``'pool'``).

    ``BackboneWithFPN`` itself is not used because its ``IntermediateLayerGetter`` needs a model whose children
    run in sequence; timm's feature wrapper returns the maps from ``forward_intermediates`` instead.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    @property
    def strides(self) -> List[int]:
        """Stride of every level the forward returns (the backbone's maps, then the max-pooled extra level)."""
        reductions = list(self.body.feature_info.reduction())
        return reductions + [reductions[-1] * 2]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def feature_backbone(
    model: Union[str, nn.Module],
    out_indices: Optional[Sequence[int]] = None,
    *,
    pretrained: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """A timm feature backbone (NCHW maps) from a model name or a model with ``forward_intermediates``.

    A name is created with ``features_only=True`` (timm's ``'getter'`` wrapper, so every family gives NCHW
    maps; timm's Swin would give NHWC with the default wrapper). A built model is wrapped in
    :class:`IntermediateFeatures`, which prunes its head and final norm in place; a built getter feature net
    (NCHW) is used as it is.
    """
    if isinstance(model, str):
        kwargs = dict(model_kwargs, features_only=True, feature_cls="getter")
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            return timm.create_model(model, pretrained=pretrained, **kwargs)
        except ValueError as e:  # the model's own argument checks (image size, dynamic sizes...)
            raise InvalidArgumentError(f"cannot build {model!r} as a feature backbone: {e}") from e
    if model_kwargs or pretrained:
        raise InvalidArgumentError("pretrained and model arguments apply to a model name, not to a built model")
    if _is_nchw_feature_net(model):
        if out_indices is not None and tuple(out_indices) != tuple(model.feature_info.out_indices):
            raise InvalidArgumentError(f"this feature backbone returns maps {tuple(model.feature_info.out_indices)}, "
                                       f"not {tuple(out_indices)}")
        return model
    if not hasattr(model, "forward_intermediates") or not isinstance(getattr(model, "feature_info", None), list):
        raise InvalidArgumentError(f"{type(model).__name__} has no timm feature API (forward_intermediates); "
                                   "a features_only model must give NCHW maps (output_fmt='NCHW')")
    if out_indices is None:
        out_indices = tuple(range(len(model.feature_info)))
    return IntermediateFeatures(model, tuple(out_indices))


def _backbone_model(body: nn.Module) -> nn.Module:
    return getattr(body, "model", body)


def _transform_kwargs(body: nn.Module, min_size: int, max_size: int) -> Dict[str, Any]:
    """torchvision transform settings: variable sizes (batches padded by torchvision) for models that take any
    size, else the one size the model was built for (torchvision's ``fixed_size`` is width, height)."""
    model = _backbone_model(body)
    cfg = getattr(body, "pretrained_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    kwargs: Dict[str, Any] = dict(
        image_mean=list(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        image_std=list(cfg.get("std", IMAGENET_DEFAULT_STD)),
        min_size=min_size,
        max_size=max_size,
    )
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if not getattr(model, "dynamic_img_size", False) and img_size is not None:
        # one size: every image is resized to it, and batches are not padded beyond it
        kwargs.update(fixed_size=(int(img_size[1]), int(img_size[0])), size_divisible=1)
    return kwargs


def build_detector(
    model: Union[str, nn.Module],
    num_classes: int,
    *,
    kind: str = "faster_rcnn",
    out_indices: Optional[Sequence[int]] = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Optional[Sequence[int]] = None,
    pretrained: bool = False,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    **detector_kwargs: Any,
) -> GeneralizedRCNN:
    """A torchvision Faster R-CNN or Mask R-CNN whose backbone is a timm model's feature maps plus an FPN.

    Args:
        model: a timm model name (``'stvit_r_swin_small_patch4_window7_224'``, ``'swin_small_patch4_window7_224'``,
            ``'local-dir:DIR'``, ``'hf-hub:org/name'``), or a built model with a feature API (its head is pruned).
        num_classes: object classes plus one for the background (torchvision's convention).
        kind: ``'faster_rcnn'`` or ``'mask_rcnn'``.
        out_indices: which feature maps feed the FPN (default: all, e.g. the four Swin stages).
        fpn_channels: FPN width; the mask head uses it too (torchvision's defaults are 256).
        representation_size: width of the box head's two fully connected layers (torchvision: 1024).
        min_size, max_size: torchvision's resizing (shorter side to ``min_size``, longer at most ``max_size``);
            batches are padded to their largest image (rounded up to 32, torchvision's default). A model built for
            one size (``img_size`` without ``dynamic_img_size``) gets every image resized to that size instead.
        anchor_sizes: one anchor size per FPN level (default: 8 x the level's stride, 32...512 for strides
            4...64 as in torchvision's ResNet-50-FPN detector); aspect ratios 0.5, 1, 2.
        pretrained: load the named model's pretrained weights (timm's mechanism).
        model_kwargs: arguments for ``timm.create_model`` (e.g. ``layout='detection'``, ``drop_path_rate``,
            ``embed_dim``). When they set neither ``img_size`` nor ``dynamic_img_size``, the model is built with
            ``dynamic_img_size=True`` at ``(min_size, max_size)`` (timm's Swin decides at build time whether a
            stage shifts its windows, so it is built at the size it will see).
        detector_kwargs: any other argument of torchvision's ``FasterRCNN`` / ``MaskRCNN`` (``box_score_thresh``,
            ``rpn_batch_size_per_image``, ``box_detections_per_img``...).
    """
    if kind not in DETECTOR_KINDS:
        raise InvalidArgumentError(f"kind must be one of {DETECTOR_KINDS}, got {kind!r}")
    if num_classes < 2:
        raise InvalidArgumentError(f"num_classes counts the background too and must be at least 2, got {num_classes}")
    model_kwargs = dict(model_kwargs or {})
    any_size = isinstance(model, str) and "img_size" not in model_kwargs and "dynamic_img_size" not in model_kwargs
    if any_size:
        model_kwargs.update(dynamic_img_size=True, img_size=(min_size, max_size))
    try:
        body = feature_backbone(model, out_indices, pretrained=pretrained, **model_kwargs)
    except InvalidArgumentError as e:
        if any_size and "dynamic_img_size" in str(e):
            raise InvalidArgumentError(f"{e} (for build_detector: model_kwargs={{'img_size': (H, W)}})") from e
        raise
    backbone = FeaturePyramidBackbone(body, fpn_channels)
    strides = backbone.strides
    sizes = list(anchor_sizes) if anchor_sizes is not None else [8 * s for s in strides]
    if len(sizes) != len(strides):
        raise InvalidArgumentError(f"anchor_sizes needs one size per FPN level ({len(strides)}), got {len(sizes)}")
    levels = [str(i) for i in range(len(strides) - 1)]  # RoI pooling reads the backbone's levels, not 'pool'
    heads: Dict[str, Any] = dict(
        rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes)),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
    )
    if kind == "mask_rcnn":
        heads.update(
            mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
            mask_head=MaskRCNNHeads(fpn_channels, (fpn_channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes),
        )
    kwargs = dict(_transform_kwargs(body, min_size, max_size), **heads)
    kwargs.update(detector_kwargs)
    detector_cls = MaskRCNN if kind == "mask_rcnn" else FasterRCNN
    return detector_cls(backbone, num_classes=None, **kwargs)


def _to_device(images: Sequence[torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device):
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_detector(
    detector: GeneralizedRCNN,
    dataset: torch.utils.data.Dataset,
    *,
    steps: int,
    batch_size: int = 4,
    optimizer: str = "adamw",
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    grad_clip: Optional[float] = None,
    seed: int = 0,
    num_workers: int = 0,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> List[Dict[str, float]]:
    """Train ``detector`` for ``steps`` optimizer steps on ``dataset`` (torchvision detection samples).

    torchvision's recipe: the model in train mode returns its loss dict, whose sum is minimised. The optimizer
    (``'adamw'``, the Swin detectors' choice, or ``'sgd'`` with momentum 0.9, torchvision's) comes from timm's
    ``create_optimizer_v2`` (no weight decay on norms and biases); the learning rate warms up linearly for
    ``warmup_steps`` and then follows a cosine to zero (timm's scheduler, per step). Shuffling and the
    detector's own sampling (RPN / RoI) draw from a generator seeded with ``seed``, so a run is repeatable;
    the caller's random state is left untouched. Returns the losses of every step; ``on_step(step, losses)``
    is called after each one.
    """

    if steps < 1 or batch_size < 1:
        raise InvalidArgumentError("steps and batch_size must be positive")
    device = next(detector.parameters()).device
    opt_kwargs = dict(momentum=0.9) if optimizer == "sgd" else {}
    opt = create_optimizer_v2(detector, opt=optimizer, lr=lr, weight_decay=weight_decay, **opt_kwargs)
    scheduler = CosineLRScheduler(opt, t_initial=steps, warmup_t=warmup_steps, warmup_lr_init=lr * 1e-3,
                                  warmup_prefix=True, t_in_epochs=False)
    history: List[Dict[str, float]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
            collate_fn=detection_collate, generator=torch.Generator().manual_seed(seed),
        )
        detector.train()
        while len(history) < steps:
            for images, targets in loader:
                losses = detector(*_to_device(images, targets, device))
                loss = sum(losses.values())
                if not math.isfinite(loss.item()):
                    raise StvitError(f"the detector's loss is {loss.item()} at step {len(history)}; lower the lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(detector.parameters(), grad_clip)
                opt.step()
                history.append({k: v.item() for k, v in losses.items()} | {"loss": loss.item()})
                scheduler.step_update(len(history))
                if on_step is not None:
                    on_step(len(history), history[-1])
                if len(history) == steps:
                    break
    return history


def coco_box_map(
    targets: Sequence[Mapping[str, torch.Tensor]],
    predictions: Sequence[Mapping[str, torch.Tensor]],
    image_sizes: Sequence[Sequence[int]],
    num_classes: int,
) -> Dict[str, float]:
    """COCO box mAP (pycocotools) of ``predictions`` (torchvision detector outputs: ``boxes``, ``scores``,
    ``labels``) against ``targets`` (``boxes``, ``labels``), one per image of ``image_sizes`` (H, W).

    Returns ``map`` (AP@[.5:.95]), ``map_50`` (AP@0.5) and ``map_75``, each in [0, 1], over all areas with up to
    100 detections per image; ``num_classes`` counts the background, as torchvision's detectors do.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise StvitError("box mAP needs pycocotools: pip install 'stvit[detection]'") from None
    images, annotations, detections = [], [], []
    for image_id, (target, pred, (h, w)) in enumerate(zip(targets, predictions, image_sizes)):
        images.append({"id": image_id, "height": int(h), "width": int(w)})
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for (x1, y1, x2, y2), score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(),
                                                  pred["labels"].tolist()):
            detections.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                               "bbox": [x1, y1, x2 - x1, y2 - y1]})
    if not detections:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    ground_truth = COCO()
    ground_truth.dataset = {"images": images, "annotations": annotations,
                            "categories": [{"id": c} for c in range(1, num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0:3]: AP@[.5:.95], AP@.5, AP@.75; -1 where there is no ground truth at all
    return {name: max(float(evaluator.stats[i]), 0.0) for i, name in enumerate(("map", "map_50", "map_75"))}


@torch.no_grad()
def evaluate_detector(detector: GeneralizedRCNN, dataset: torch.utils.data.Dataset, *,
                      batch_size: int = 4) -> Dict[str, float]:
    """COCO box mAP of ``detector`` on ``dataset`` (see :func:`coco_box_map`)."""
    device = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=detection_collate)
    targets, predictions, sizes = [], [], []
    try:
        for images, batch_targets in loader:
            outputs = detector([i.to(device) for i in images])
            targets += batch_targets
            predictions += [{k: v.cpu() for k, v in out.items()} for out in outputs]
            sizes += [tuple(i.shape[-2:]) for i in images]
    finally:
        detector.train(was_training)
    num_classes = detector.roi_heads.box_predictor.cls_score.out_features
    return coco_box_map(targets, predictions, sizes, num_classes)
