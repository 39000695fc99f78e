"""Built-in models, written in plain torch (torchvision is unusable with the CPU build).

They are addressed by name in a MODEL SPEC (``digits-cnn``, ``digits-mlp``,
``resnet9``, ``resnet9-narrow``) and are also the models the demo, tests and benchmarks use.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for 1×16×16 digits: two conv blocks with BatchNorm, then a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class DigitsMLP(nn.Module):
    """A two-hidden-layer MLP on flattened 1×16×16 digits."""

    def __init__(self, num_classes: int = 10, in_features: int = 256, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.block(x)
        return out


class ResNet9(nn.Module):
    """The ResNet-9 of the DAWNBench CIFAR recipe (about 6.6M parameters on 3×32×32); channels width·(1, 2, 4, 8)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w, pool=True),
            _Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True),
            _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class NarrowResNet9(ResNet9):
    """ResNet-9's layout at a quarter of its widths (16, 32, 64, 128 channels; about 0.41M parameters).

    Trains and featurizes about 16× faster than ``resnet9``, so retrained ground truth (LDS) fits on a CPU.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__(num_classes, in_channels, width)


BUILTIN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "digits-mlp": DigitsMLP,
    "resnet9": ResNet9,
    "resnet9-narrow": NarrowResNet9,
}
