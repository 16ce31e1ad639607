"""Exact channel removal for ``CifarMobileNetV2``.

Channel sets (names are the producing conv's module path): ``layers.K.conv1``, the hidden channels of
block K (expand conv, depthwise conv, projection input; default scope); ``conv1``, the stem, which block
0's depthwise conv shares, and ``layers.K.conv3``, the outputs of block K and of the residual blocks that
add into them. A pruned network is the same class built with smaller widths.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..models.mobilenetv2 import CifarMobileNetV2, block_specs
from ..types import ChannelSet, Keep
from .base import Block, WidthsAdapter, check_width, check_widths, load_bn, load_layer, on_device_of, register_adapter, \
    spec_error


def _runs(model: CifarMobileNetV2) -> list[list[int]]:
    """Blocks grouped by the stream their outputs share: a non-residual block and the residual blocks
    that add into its output."""
    runs: list[list[int]] = []
    for k, block in enumerate(model.layers):
        if block.residual:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _reader(model: CifarMobileNetV2, k: int) -> tuple[str, str] | None:
    """(conv, its BatchNorm) that reads block ``k``'s output as a plain 1x1 conv, None if a depthwise
    conv reads it."""
    if k + 1 == len(model.layers):
        return "conv2", "bn2"
    nxt = model.layers[k + 1]
    return (f"layers.{k + 1}.conv1", f"layers.{k + 1}.bn1") if nxt.expand else None


def _hidden_set(name: str, size: int, producers: tuple[str, ...], block: str) -> ChannelSet:
    return ChannelSet(name=name, size=size, producers=producers, tap=f"{block}.conv3",
                      consumers=(f"{block}.conv3",), consumer_norms=(f"{block}.bn3",))


@register_adapter(CifarMobileNetV2)
class MobileNetV2Adapter(WidthsAdapter):
    classifier = "linear"

    def registry_name(self, model: CifarMobileNetV2) -> str:
        return "mobilenetv2"

    def channel_sets(self, model: CifarMobileNetV2, example_input: torch.Tensor, scope: str
                     ) -> list[ChannelSet]:
        inner = [_hidden_set(f"layers.{k}.conv1", b.conv1.out_channels,
                             (f"layers.{k}.conv1", f"layers.{k}.conv2"), f"layers.{k}")
                 for k, b in enumerate(model.layers) if b.expand]
        if scope == "default":
            return inner
        if model.layers[0].expand:  # the stem is then read by block 0's expand conv
            streams = [ChannelSet(name="conv1", size=model.stem, producers=("conv1",), tap="layers.0.conv1",
                                  consumers=("layers.0.conv1",), consumer_norms=("layers.0.bn1",))]
        else:  # block 0's depthwise conv works on the stem's channels: they are block 0's hidden channels
            streams = [_hidden_set("conv1", model.stem, ("conv1", "layers.0.conv2"), "layers.0")]
        for run in _runs(model):
            name = f"layers.{run[0]}.conv3"
            producers = tuple(f"layers.{k}.conv3" for k in run)
            size = model.layers[run[0]].conv3.out_channels
            reader = _reader(model, run[-1])
            if len(run) == 1 and reader is not None:
                streams.append(ChannelSet(name=name, size=size, producers=producers, tap=reader[0],
                                          consumers=(reader[0],), consumer_norms=(reader[1],)))
            else:
                streams.append(ChannelSet(name=name, size=size, producers=producers, tap=f"layers.{run[-1]}",
                                          tap_input=False, kind="stream" if len(run) > 1 else "conv"))
        position = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return sorted(inner + streams, key=lambda s: position[s.name])

    def blocks(self, model: CifarMobileNetV2) -> list[Block]:
        return [Block(f"layers.{k}", adds_to=f"layers.{k}.conv3" if b.residual else "")
                for k, b in enumerate(model.layers)]

    def apply_keep(self, model: CifarMobileNetV2, keep: Keep, example_input: torch.Tensor) -> CifarMobileNetV2:
        out_keep = {k: keep[f"layers.{run[0]}.conv3"] for run in _runs(model) for k in run}
        hidden, in_keep = [], keep["conv1"]
        for k, block in enumerate(model.layers):
            hidden.append(keep[f"layers.{k}.conv1"] if block.expand else in_keep)
            in_keep = out_keep[k]
        new = CifarMobileNetV2(self.num_classes(model), stem=len(keep["conv1"]),
                               hidden_widths=[len(h) for h in hidden],
                               out_widths=[len(out_keep[k]) for k in range(len(model.layers))], head=model.head)
        load_layer(new.conv1, model.conv1, out=keep["conv1"])
        load_bn(new.bn1, model.bn1, keep["conv1"])
        in_keep = keep["conv1"]
        for k, (old, dst) in enumerate(zip(model.layers, new.layers)):
            if old.expand:
                load_layer(dst.conv1, old.conv1, out=hidden[k], inp=in_keep)
                load_bn(dst.bn1, old.bn1, hidden[k])
            load_layer(dst.conv2, old.conv2, out=hidden[k])  # depthwise: one input channel per filter
            load_bn(dst.bn2, old.bn2, hidden[k])
            load_layer(dst.conv3, old.conv3, out=out_keep[k], inp=hidden[k])
            load_bn(dst.bn3, old.bn3, out_keep[k])
            in_keep = out_keep[k]
        load_layer(new.conv2, model.conv2, inp=in_keep)
        load_bn(new.bn2, model.bn2, None)
        load_layer(new.linear, model.linear)
        return on_device_of(new, model)

    def check_widths(self, widths: Mapping[str, Any], original: CifarMobileNetV2) -> None:
        stem = check_width("kwargs.stem", widths.get("stem", original.stem), original.stem)
        check_width("kwargs.head", widths.get("head", original.head), original.head)
        defaults = block_specs(stem)  # what the constructor fills in for a list the spec leaves out
        hidden = check_widths("kwargs.hidden_widths", widths.get("hidden_widths", [s[1] for s in defaults]),
                              original.hidden_widths)
        out = check_widths("kwargs.out_widths", widths.get("out_widths", [s[2] for s in defaults]),
                           original.out_widths)
        # A block without an expand conv filters its input channels depthwise, and a residual block adds
        # its input to its output: both need the incoming width.
        for k, (_, _, _, _, expand, residual) in enumerate(defaults):
            incoming = stem if k == 0 else out[k - 1]
            if not expand and hidden[k] != incoming:
                raise spec_error(f"kwargs.hidden_widths[{k}]", hidden[k], f"{incoming} (block {k} has no expand "
                                 "conv: its width is its input's)")
            if residual and out[k] != incoming:
                raise spec_error(f"kwargs.out_widths[{k}]", out[k], f"{incoming} (block {k} is residual: its "
                                 "width is its input's)")
