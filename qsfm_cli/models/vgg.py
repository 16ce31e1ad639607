"""VGG-16 with BatchNorm, the CIFAR variant of HRank and CHIP.

13 3x3 convs (``features.conv{i}``/``norm{i}``/``relu{i}``, ``pool{i}`` at the max-pool positions), a 2x2
average pool, then ``classifier.linear1`` (512 -> 512), ``norm1``, ``relu1``, ``linear2``. ``cfg`` holds
the conv widths with ``"M"`` for the pools; a pruned network is the same class with a smaller ``cfg``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .base import register_model

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class CifarVGG(nn.Module):
    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 10, hidden: int = 512):
        super().__init__()
        self.cfg = list(cfg)
        self.hidden = hidden
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for i, width in enumerate(self.cfg):
            if width == "M":
                layers[f"pool{i}"] = nn.MaxPool2d(2, 2)
                continue
            layers[f"conv{i}"] = nn.Conv2d(in_channels, int(width), 3, padding=1)
            layers[f"norm{i}"] = nn.BatchNorm2d(int(width))
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            in_channels = int(width)
        self.features = nn.Sequential(layers)
        self.pool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(in_channels, hidden)),
            ("norm1", nn.BatchNorm1d(hidden)),
            ("relu1", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, num_classes)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def widths(self) -> dict:
        return {"cfg": self.cfg, "hidden": self.hidden}


@register_model
def vgg16_bn(num_classes: int = 10, **kwargs) -> CifarVGG:
    """VGG-16-BN, CIFAR variant (HRank/CHIP)."""
    return CifarVGG(num_classes=num_classes, **kwargs)
