"""MobileNetV2 (Sandler et al. 2018), CIFAR variant.

Same blocks as the ImageNet network (expansion 6, ReLU6, depthwise 3x3, linear bottleneck, residual when
stride is 1 and widths match), with the strides adapted to 32x32 inputs as in the widely used CIFAR ports:
the stem conv and the second stage (24 channels) use stride 1 instead of 2, so the feature maps go
32 -> 32 -> 16 -> 8 -> 4 before the 1280-wide head. No dropout.

Names: ``conv1``/``bn1`` stem; ``layers.{k}`` blocks with ``conv1``/``bn1`` expand (absent for expansion 1),
``conv2``/``bn2`` depthwise, ``conv3``/``bn3`` projection; ``conv2``/``bn2`` head; ``linear``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import register_model

# (expansion, out channels, repeats, stride) of each stage; strides adapted to CIFAR.
CIFAR_STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, hidden: int, out_planes: int, stride: int, expand: bool,
                 residual: bool):
        super().__init__()
        self.expand = expand
        self.residual = residual
        if expand:
            self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.conv1(x))) if self.expand else x
        out = F.relu6(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.residual else out


def block_specs(stem: int = 32):
    """(in, hidden, out, stride, expand, residual) of every block of the unpruned network with a
    ``stem``-wide stem."""
    specs, in_planes = [], stem
    for t, c, n, s in CIFAR_STAGES:
        for i in range(n):
            stride = s if i == 0 else 1
            # The repeats of a stage add their input; a stage's first block changes the width, so it never
            # does, whatever the widths after pruning (a stem pruned to 16 channels must not turn block 0
            # residual).
            specs.append((in_planes, in_planes * t, c, stride, t != 1, i > 0))
            in_planes = c
    return specs


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, stem: int = 32, hidden_widths: Sequence[int] | None = None,
                 out_widths: Sequence[int] | None = None, head: int = 1280):
        super().__init__()
        specs = block_specs(stem)
        self.stem = stem
        self.hidden_widths = list(hidden_widths) if hidden_widths is not None else [s[1] for s in specs]
        self.out_widths = list(out_widths) if out_widths is not None else [s[2] for s in specs]
        self.head = head
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks, in_planes = [], stem
        for (_, _, _, stride, expand, residual), hidden, out in zip(specs, self.hidden_widths, self.out_widths):
            blocks.append(InvertedResidual(in_planes, hidden, out, stride, expand, residual))
            in_planes = out
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.linear = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu6(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

    def widths(self) -> dict:
        return {"stem": self.stem, "hidden_widths": self.hidden_widths, "out_widths": self.out_widths,
                "head": self.head}


@register_model
def mobilenetv2(num_classes: int = 10, **kwargs) -> CifarMobileNetV2:
    """MobileNetV2, CIFAR strides (see module docstring)."""
    return CifarMobileNetV2(num_classes=num_classes, **kwargs)
