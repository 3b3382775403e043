"""Detector registry: ``get_detector(name, num_classes=...)``, ``list_detectors()``,
``detector_spec(name)`` with each architecture's training defaults.

A detector here is a torchvision detection model: it takes a list of float RGB tensors (3, H, W)
in 0..1 of any size, resizes them itself, and returns boxes in the pixels of the images it was
given. ``num_classes`` counts object classes; the background class torchvision wants is added
here. No weights are ever downloaded (``weights=None, weights_backbone=None`` always); the one
pretrained backbone loads ImageNet weights from a hash-checked local file (``assets``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from quarkflow_core.errors import InvalidInput

# Internal score floor of every detector: lower than any threshold a caller filters by, so
# evaluation sees the low-confidence tail mAP needs, and cheap because NMS drops most boxes.
INTERNAL_SCORE_FLOOR = 0.01
DETECTIONS_PER_IMAGE = 100


@dataclass(frozen=True)
class DetectorSpec:
    """An architecture and the recipe that trains it well enough from its own defaults."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    image_size: int  # the side images are resized to (short side for Faster R-CNN)
    lr: float  # AdamW peak learning rate (one-cycle)
    batch_size: int
    epochs: int
    pretrained_backbone: bool  # whether fit uses ImageNet backbone weights by default
    supports_pretrained: bool


_REGISTRY: dict[str, DetectorSpec] = {}


def register(name: str, **defaults):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = DetectorSpec(name=name, builder=fn, **defaults)
        return fn

    return deco


def list_detectors() -> list[str]:
    return sorted(_REGISTRY)


def detector_spec(name: str) -> DetectorSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidInput(
            f"unknown detector architecture {name!r}; valid names: {', '.join(list_detectors())}"
        ) from None


def get_detector(
    name: str,
    *,
    num_classes: int,
    pretrained_backbone: bool = False,
    image_size: int | None = None,
    frozen_norm: bool | None = None,
) -> nn.Module:
    """An untrained detector for ``num_classes`` object classes (background added here).

    ``pretrained_backbone`` loads ImageNet weights into the backbone (only where the spec
    supports it). ``frozen_norm`` (default: same as ``pretrained_backbone``) freezes the
    backbone's batch norm, which is part of the module structure: a saved artifact rebuilds
    with the value it was trained with and ``pretrained_backbone=False``, so loading never needs
    the ImageNet file."""
    spec = detector_spec(name)
    if num_classes < 1:
        raise InvalidInput(f"num_classes must be >= 1 (object classes), got {num_classes}")
    if pretrained_backbone and not spec.supports_pretrained:
        raise InvalidInput(
            f"{name} has no pretrained backbone here; train it from scratch or use one of "
            + ", ".join(n for n in list_detectors() if _REGISTRY[n].supports_pretrained)
        )
    size = image_size or spec.image_size
    if not 64 <= size <= 2048:
        raise InvalidInput(f"image_size must be in 64..2048, got {size}")
    return spec.builder(
        num_classes=num_classes,
        pretrained_backbone=pretrained_backbone,
        image_size=size,
        frozen_norm=pretrained_backbone if frozen_norm is None else frozen_norm,
    )


def model_image_size(model: nn.Module) -> int:
    """The (short) side a built detector resizes its inputs to."""
    return int(model.transform.min_size[0])


@register(
    "ssdlite320",
    description="SSDlite on MobileNetV3-Large (torchvision), from scratch: fast on CPU, but "
    "needs many epochs (torchvision's recipe: 600) before it finds small objects",
    image_size=320,
    lr=2e-3,
    batch_size=16,
    epochs=60,
    pretrained_backbone=False,
    supports_pretrained=False,
)
def _ssdlite320(
    *, num_classes: int, pretrained_backbone: bool, image_size: int, frozen_norm: bool
) -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    if frozen_norm:
        raise InvalidInput("ssdlite320 trains its batch norm; frozen_norm is not available")
    model = ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes + 1
    )
    # torchvision passes extra kwargs to the backbone too, so the SSD knobs are set afterwards
    model.score_thresh = INTERNAL_SCORE_FLOOR
    model.detections_per_img = DETECTIONS_PER_IMAGE
    model.topk_candidates = 300
    # default boxes are relative to the image, so any square size works with the same anchors
    model.transform = GeneralizedRCNNTransform(
        image_size,
        image_size,
        model.transform.image_mean,
        model.transform.image_std,
        size_divisible=1,
        fixed_size=(image_size, image_size),
    )
    return model


# MobileNetV2's feature blocks where the stride reaches 8, 16 and 32 (channels 32, 96, 320):
# three FPN levels plus a max-pooled fourth. torchvision's own mobilenet FPN takes only the
# last two strides, which leaves digits of 12-30 px with no fine enough level.
MNV2_RETURN = {"6": "0", "13": "1", "17": "2"}
MNV2_CHANNELS = [32, 96, 320]
MNV2_FROZEN_BLOCKS = 7  # pretrained: blocks 0..6 (stride <= 8) keep ImageNet weights, as
# torchvision's trainable_backbone_layers=3 does; also halves backward time on CPU
FPN_CHANNELS = 128
BOX_HEAD_WIDTH = 256  # torchvision uses 1024: 4x the cost for few, simple classes


@register(
    "fasterrcnn_mnv2_fpn",
    description="Faster R-CNN on MobileNetV2 + FPN (strides 8-64); ImageNet backbone from a "
    "local file: learns digits and trees in a few CPU minutes",
    image_size=320,
    lr=5e-4,
    batch_size=4,
    epochs=4,  # 360 fit images: hold-out mAP@0.5 0.84; the demo's 270: 0.65 (make bench)
    pretrained_backbone=True,
    supports_pretrained=True,
)
def _fasterrcnn_mnv2_fpn(
    *, num_classes: int, pretrained_backbone: bool, image_size: int, frozen_norm: bool
) -> nn.Module:
    import torch
    from torchvision.models import mobilenet_v2
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d if frozen_norm else None)
    if pretrained_backbone:
        from quarkflow_core.detection.assets import mobilenet_v2_weights

        state = torch.load(mobilenet_v2_weights(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        for p in net.features[:MNV2_FROZEN_BLOCKS].parameters():
            p.requires_grad_(False)
    backbone = BackboneWithFPN(
        net.features,
        return_layers=MNV2_RETURN,
        in_channels_list=MNV2_CHANNELS,
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(
        sizes=((16, 24), (32, 48), (64, 96), (128, 192)),
        aspect_ratios=((0.5, 1.0, 2.0),) * 4,
    )
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=300,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(FPN_CHANNELS * 7 * 7, BOX_HEAD_WIDTH),
        box_predictor=FastRCNNPredictor(BOX_HEAD_WIDTH, num_classes + 1),
        box_batch_size_per_image=128,  # 256 spends a third of a CPU step in RoIAlign backward
        box_score_thresh=INTERNAL_SCORE_FLOOR,
        box_detections_per_img=DETECTIONS_PER_IMAGE,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
