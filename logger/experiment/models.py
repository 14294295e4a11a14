"""Models by name, sized to the input: ``mlp``, ``cnn``, torchvision ``resnet18``/``efficientnet_b0``, ``resnet18_gn``.

``resnet18_gn`` is ResNet-18 with every BatchNorm replaced by GroupNorm (32 groups): a twin without batch statistics.

All weights are random (``weights=None``): nothing is downloaded. The torchvision models are built for
``num_classes`` and ``in_channels``; for small inputs (side < 64 px, e.g. 8×8 digits or 32×32 CIFAR) their
ImageNet stem would shrink the image to nothing, so it is replaced by a stride-1 3×3 convolution (and ResNet's
max-pool is dropped), the usual CIFAR adaptation. The later stages still downsample; with 8×8 inputs the last
stages run at 1×1, which is legal but means those convolutions see no spatial context.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

__all__ = ["MODELS", "build_model"]

MODELS = ("mlp", "cnn", "resnet18", "resnet18_gn", "efficientnet_b0")

GN_GROUPS = 32
"""Groups of the GroupNorm layers of ``resnet18_gn`` (every ResNet-18 width is a multiple of 32)."""

SMALL_INPUT = 64
"""Inputs with a side below this many pixels get the stride-1 stem in the torchvision models."""


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, *, width: int = 256) -> nn.Module:
    """Build a freshly initialised model (seed torch before calling for reproducible weights).

    Args:
        name: One of :data:`MODELS`.
        input_shape: ``(C, H, W)`` of one input.
        num_classes: Number of output classes.
        width: Hidden width of ``mlp`` (three hidden layers) and channel base of ``cnn``.

    Returns:
        The model (in training mode).

    Raises:
        ValueError: Unknown name or a bad shape.

    """
    if len(input_shape) != 3 or min(input_shape) < 1 or num_classes < 2:
        raise ValueError(f"need a (C, H, W) input shape and >= 2 classes, got {input_shape}, {num_classes}")
    channels, height, width_px = input_shape
    if name == "mlp":
        return mlp(channels * height * width_px, num_classes, width)
    if name == "cnn":
        return cnn(channels, num_classes, max(8, width // 8))
    small = min(height, width_px) < SMALL_INPUT
    if name in ("resnet18", "resnet18_gn"):
        return resnet18(channels, num_classes, small, group_norm=name == "resnet18_gn")
    if name == "efficientnet_b0":
        return efficientnet_b0(channels, num_classes, small)
    raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)}")


def mlp(in_features: int, num_classes: int, hidden: int = 256) -> nn.Sequential:
    """Fully connected ReLU network with three hidden layers (four Linear layers: first / middle / last)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(in_channels: int, num_classes: int, base: int = 32) -> nn.Sequential:
    """Small CNN without normalisation layers (per-example gradients stay exact in train mode).

    Three 3×3 convolutions (one 2× max-pool), adaptive pooling to 2×2, then two Linear layers; any input side ≥ 2.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, base, 3, padding=1), nn.ReLU(),
        nn.Conv2d(base, 2 * base, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(2 * base, 2 * base, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * base, 4 * base), nn.ReLU(),
        nn.Linear(4 * base, num_classes),
    )


def resnet18(in_channels: int, num_classes: int, small: bool, group_norm: bool = False) -> nn.Module:
    """Torchvision ResNet-18 (random weights); stride-1 3×3 stem and no max-pool for small inputs.

    With ``group_norm`` every BatchNorm is a ``GroupNorm(32, C)`` (torchvision initialises both to weight 1, bias 0):
    the same network without batch statistics, whose per-example gradients are defined in train mode.
    """
    from torchvision.models import resnet18 as tv_resnet18

    norm = (lambda c: nn.GroupNorm(GN_GROUPS, c)) if group_norm else None
    model = tv_resnet18(weights=None, num_classes=num_classes, norm_layer=norm)
    if small:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def efficientnet_b0(in_channels: int, num_classes: int, small: bool) -> nn.Module:
    """Torchvision EfficientNet-B0 (random weights); the stem convolution takes ``in_channels``, stride 1 if small."""
    from torchvision.models import efficientnet_b0 as tv_efficientnet_b0

    model = tv_efficientnet_b0(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1 if small else 2, padding=1,
                                     bias=False)
    return model
