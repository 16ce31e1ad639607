"""CIFAR ResNets of He et al. 2016 (section 4.2) with the zero-padding ("option A") shortcut.

Module names follow the public ``pytorch_resnet_cifar10`` checkpoints (``conv1, bn1, layer1.0.conv1, ...,
linear``) so those weights load directly. Widths are stored per layer so that a pruned network is the
same class with smaller numbers: ``stage_widths`` are the residual-stream widths of the three stages,
``mid_widths`` the inner width of every block, in order, ``stem_width`` the stem conv's width (the
stage-1 width unless the stem is pruned on its own, as CHIP's rate layout does).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import WeightCard, register_model


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride``; input channel ``c`` lands at output
    channel ``index[c]`` (``-1``: dropped), every other output channel is zero.

    For the unpruned network ``index`` is ``range(pad, pad + in_planes)`` — the symmetric zero padding of
    the original code. After pruning it maps every kept input channel to its new position exactly.
    """

    def __init__(self, index: Sequence[int], out_planes: int, stride: int):
        super().__init__()
        index = torch.as_tensor(list(index), dtype=torch.long)
        kept = index >= 0
        self.register_buffer("src", kept.nonzero().flatten(), persistent=False)
        self.register_buffer("dst", index[kept], persistent=False)
        self.index = index.tolist()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.out_planes, x.shape[2], x.shape[3])
        out[:, self.dst] = x[:, self.src]
        return out


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, mid_planes: int, planes: int, stride: int = 1,
                 shortcut_index: Sequence[int] | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(mid_planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if shortcut_index is None and (stride != 1 or in_planes != planes):
            # Symmetric zero padding; a negative pad crops, like F.pad in the HRank/CHIP code.
            pad = (planes - in_planes) // 2
            shortcut_index = [c + pad if 0 <= c + pad < planes else -1 for c in range(in_planes)]
        self.shortcut: nn.Module = (
            nn.Identity() if shortcut_index is None else PadShortcut(shortcut_index, planes, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, stage_widths: Sequence[int] = (16, 32, 64),
                 mid_widths: Sequence[int] | None = None,
                 shortcut_indices: Sequence[Sequence[int] | None] | None = None,
                 stem_width: int | None = None):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.stage_widths = list(stage_widths)
        self.mid_widths = list(mid_widths) if mid_widths is not None else [
            w for w in self.stage_widths for _ in range(n)]
        self.shortcut_indices = list(shortcut_indices) if shortcut_indices is not None else [None] * 3
        self.stem_width = stem_width if stem_width is not None else self.stage_widths[0]
        self.conv1 = nn.Conv2d(3, self.stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.stem_width)
        in_planes = self.stem_width
        mids = iter(self.mid_widths)
        for s, planes in enumerate(self.stage_widths):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                index = self.shortcut_indices[s] if b == 0 else None
                blocks.append(BasicBlock(in_planes, next(mids), planes, stride, index))
                in_planes = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def widths(self) -> dict:
        """Keyword arguments of ``create_model(f"resnet{depth}", ...)`` that rebuild this (possibly pruned)
        architecture."""
        return {"stage_widths": self.stage_widths, "mid_widths": self.mid_widths,
                "shortcut_indices": [None if i is None else list(i) for i in self.shortcut_indices],
                "stem_width": self.stem_width}


_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# The public CIFAR-10 weights of the pytorch_resnet_cifar10 project (depth -> sha256 prefix), trained on
# inputs in [0, 1] normalized with ImageNet statistics.
_PUBLIC_WEIGHTS = {20: "12fca82f", 32: "d509ac18", 44: "014dd654", 56: "4bfd9763", 110: "1d1ed7c2"}


def _card(depth: int) -> WeightCard | None:
    sha = _PUBLIC_WEIGHTS.get(depth)
    if sha is None:
        return None
    return WeightCard(url=f"{_AKAMASTER}resnet{depth}-{sha}.th", sha256=sha, mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225), input_size=(3, 32, 32), num_classes=10, dataset="cifar10",
                      source="akamaster/pytorch_resnet_cifar10 (Yerlan Idelbayev)", license="BSD-2-Clause")


def _resnet(depth: int):
    def build(num_classes: int = 10, **kwargs) -> CifarResNet:
        return CifarResNet(depth, num_classes, **kwargs)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth}, option-A shortcut."
    return register_model(build, card=_card(depth))


resnet8, resnet20, resnet32, resnet44, resnet56, resnet110 = (_resnet(d) for d in (8, 20, 32, 44, 56, 110))

