"""Exact channel removal for ``CifarResNet``.

A pruned network is the same class built with smaller widths, its weights copied from the kept rows and
columns; nothing is traced, so the zero-padding shortcut (which Torch-Pruning cannot follow) is remapped
exactly: input channel ``c`` of a ``PadShortcut`` lands at the new position of the output channel it fed,
or is dropped when that output channel is removed.

Channel sets (names are the producing conv's module path): ``layerS.B.conv1``, the inner width of block B
of stage S (default scope); ``conv1``, the stem, pruned on its own (its kept channels are mapped into
stage 1 by ``layer1.0``'s shortcut), and ``layerS.0.conv2``, stage S's residual stream (every block's
``conv2`` of the stage). The papers' rate layouts over these sets are in ``qsfm_cli.papers``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..models.resnet_cifar import CifarResNet, PadShortcut
from ..types import ChannelSet, Keep
from .base import Block, RateLayout, WidthsAdapter, check_width, check_widths, load_bn, load_layer, \
    on_device_of, register_adapter, spec_error


def _blocks(model: CifarResNet) -> list[str]:
    return [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(len(getattr(model, f"layer{s}")))]


def _shortcut_map(shortcut: nn.Module, in_planes: int) -> list[int]:
    """Output position of every input channel of a block's shortcut (-1: dropped)."""
    return list(shortcut.index) if isinstance(shortcut, PadShortcut) else list(range(in_planes))


@register_adapter(CifarResNet)
class ResNetAdapter(WidthsAdapter):
    classifier = "linear"

    def registry_name(self, model: CifarResNet) -> str:
        return f"resnet{model.depth}"

    def channel_sets(self, model: CifarResNet, example_input: torch.Tensor, scope: str) -> list[ChannelSet]:
        inner = [ChannelSet(name=f"{b}.conv1", size=model.get_submodule(f"{b}.conv1").out_channels,
                            producers=(f"{b}.conv1",), tap=f"{b}.conv2", consumers=(f"{b}.conv2",),
                            consumer_norms=(f"{b}.bn2",)) for b in _blocks(model)]
        if scope == "default":
            return inner
        stem = ChannelSet(name="conv1", size=model.stem_width, producers=("conv1",), tap="layer1.0",
                          kind="stream")
        streams = []
        for s in (1, 2, 3):
            stage = [f"layer{s}.{b}" for b in range(len(getattr(model, f"layer{s}")))]
            streams.append(ChannelSet(name=f"{stage[0]}.conv2", size=model.stage_widths[s - 1],
                                      producers=tuple(f"{b}.conv2" for b in stage), tap=stage[-1],
                                      tap_input=False, kind="stream"))
        position = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return sorted([stem, *inner, *streams], key=lambda s: position[s.name])

    def rate_layouts(self, model: CifarResNet) -> list[RateLayout]:
        return resnet_rate_layouts(_blocks(model))

    def blocks(self, model: CifarResNet) -> list[Block]:
        return [Block(b, adds_to=f"{b}.conv2", shortcut=f"{b}.shortcut") for b in _blocks(model)]

    def apply_keep(self, model: CifarResNet, keep: Keep, example_input: torch.Tensor) -> CifarResNet:
        stem = keep["conv1"]
        stages = [keep[f"layer{s}.0.conv2"] for s in (1, 2, 3)]
        blocks = _blocks(model)
        indices: list[list[int] | None] = []
        for s in range(3):
            first = model.get_submodule(f"layer{s + 1}.0")
            in_keep = stem if s == 0 else stages[s - 1]
            old = _shortcut_map(first.shortcut, first.conv1.in_channels)
            new_pos = {c: i for i, c in enumerate(stages[s])}
            index = [new_pos.get(old[c], -1) for c in in_keep]
            identity = s == 0 and index == list(range(len(stages[0])))
            indices.append(None if identity else index)
        new = CifarResNet(model.depth, self.num_classes(model), stage_widths=[len(k) for k in stages],
                          mid_widths=[len(keep[f"{b}.conv1"]) for b in blocks], shortcut_indices=indices,
                          stem_width=len(stem))
        load_layer(new.conv1, model.conv1, out=stem)
        load_bn(new.bn1, model.bn1, stem)
        in_keep = stem
        for b in blocks:
            mid, out = keep[f"{b}.conv1"], stages[int(b.split(".")[0][len("layer"):]) - 1]
            old, dst = model.get_submodule(b), new.get_submodule(b)
            load_layer(dst.conv1, old.conv1, out=mid, inp=in_keep)
            load_bn(dst.bn1, old.bn1, mid)
            load_layer(dst.conv2, old.conv2, out=out, inp=mid)
            load_bn(dst.bn2, old.bn2, out)
            in_keep = out
        load_layer(new.linear, model.linear, inp=in_keep)
        return on_device_of(new, model)

    def check_widths(self, widths: Mapping[str, Any], original: CifarResNet) -> None:
        stages = check_widths("kwargs.stage_widths", widths.get("stage_widths", original.stage_widths),
                              original.stage_widths)
        check_widths("kwargs.mid_widths", widths.get("mid_widths", original.mid_widths), original.mid_widths)
        stem = check_width("kwargs.stem_width", widths.get("stem_width", original.stem_width),
                           original.stem_width)
        indices = widths.get("shortcut_indices", [None] * 3)
        if not isinstance(indices, (list, tuple)) or len(indices) != 3:
            raise spec_error("kwargs.shortcut_indices", indices, "a list of 3 entries, each null or a list")
        for s, index in enumerate(indices):
            if index is None:
                continue
            field, width = f"kwargs.shortcut_indices[{s}]", stem if s == 0 else stages[s - 1]
            if not isinstance(index, (list, tuple)) or len(index) != width:
                raise spec_error(field, index, f"null or a list of {width} integers (one per input channel)")
            # Each kept input channel lands on its own output channel; two landing on one would make
            # the shortcut's scatter ambiguous.
            targets = [i for i in index if not isinstance(i, bool) and isinstance(i, int) and i >= 0]
            if any(isinstance(i, bool) or not isinstance(i, int) or not -1 <= i < stages[s] for i in index) \
                    or len(set(targets)) != len(targets):
                raise spec_error(field, index, f"integers in [-1, {stages[s]}), the non-negative ones distinct")


def resnet_rate_layouts(blocks: Sequence[str]) -> list[RateLayout]:
    """CHIP's and HRank's rate lists for a CIFAR ResNet whose residual blocks are ``blocks`` (module
    paths ``layerS.B``, in forward order), over the channel sets of ``pruning.resnet_cifar``."""
    inner = tuple(f"{b}.conv1" for b in blocks)
    n = len(blocks)
    chip = RateLayout(
        "chip", f"CHIP, {3 + n} entries: stem conv, stage-1 and stage-2 block outputs, then the inner width "
        f"of each of the {n} blocks (stage-3 outputs are never pruned; needs prune.scope=stage)",
        ("conv1", "layer1.0.conv2", "layer2.0.conv2") + inner)
    per_conv = (None,) + tuple(t for name in inner for t in (name, None))
    hrank = RateLayout(
        "hrank", f"HRank, {1 + 2 * n} entries, one per conv: stem, then conv1, conv2 of each block; as in "
        "HRank's pruned-model code only the conv1 entries apply (stem and conv2 entries are ignored)",
        per_conv)
    return [chip, hrank]
