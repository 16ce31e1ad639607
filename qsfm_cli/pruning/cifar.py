"""Exact channel removal for the CIFAR models: ``CifarResNet``, ``CifarVGG``, ``CifarMobileNetV2``.

A pruned network is the same class built with smaller widths, its weights copied from the kept rows and
columns; nothing is traced, so the zero-padding shortcut (which Torch-Pruning cannot follow) is remapped
exactly: input channel ``c`` of a ``PadShortcut`` lands at the new position of the output channel it fed,
or is dropped when that output channel is removed.

Channel sets (names are the producing conv's module path):

- ``CifarResNet``: ``layerS.B.conv1`` (inner width of block B of stage S; default scope); ``conv1`` (the
  stem, pruned on its own: its kept channels are mapped into stage 1 by ``layer1.0``'s shortcut) and
  ``layerS.0.conv2`` (stage S's residual stream: every block's ``conv2`` of the stage).
- ``CifarVGG``: ``features.convI`` for every conv.
- ``CifarMobileNetV2``: ``layers.K.conv1`` (hidden channels of block K: expand conv, depthwise conv,
  projection input; default scope); ``conv1`` (the stem, which block 0's depthwise conv shares) and
  ``layers.K.conv3`` (the outputs of block K and of the residual blocks that add into them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..models.mobilenetv2 import CifarMobileNetV2
from ..models.resnet_cifar import CifarResNet, PadShortcut
from ..models.vgg import CifarVGG
from ..types import ChannelSet

CIFAR_MODELS = (CifarResNet, CifarVGG, CifarMobileNetV2)


@dataclass(frozen=True)
class RateLayout:
    """How a published per-layer rate list maps onto channel sets: ``targets[k]`` is the set entry ``k``
    prunes, ``None`` for an entry the paper's code ignores."""

    name: str
    description: str
    targets: tuple[str | None, ...]


def is_cifar(model: nn.Module) -> bool:
    return isinstance(model, CIFAR_MODELS)


def classifier_name(model: nn.Module) -> str:
    return "classifier.linear2" if isinstance(model, CifarVGG) else "linear"


def registry_name(model: nn.Module) -> str:
    if isinstance(model, CifarResNet):
        return f"resnet{model.depth}"
    return "vgg16_bn" if isinstance(model, CifarVGG) else "mobilenetv2"


def num_classes(model: nn.Module) -> int:
    return model.get_submodule(classifier_name(model)).out_features


def channel_sets(model: nn.Module, scope: str) -> list[ChannelSet]:
    """The model's channel sets of ``scope`` ("default", or "stage"/"all": every set), in forward order."""
    if isinstance(model, CifarResNet):
        inner, streams = _resnet_sets(model)
    elif isinstance(model, CifarVGG):
        inner, streams = _vgg_sets(model), []
    else:
        inner, streams = _mobilenet_sets(model)
    sets = inner if scope == "default" else inner + streams
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(sets, key=lambda s: position[s.name])


def apply_keep(model: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    """The pruned copy of ``model``; ``keep`` names every set of scope "all" with sorted kept indices."""
    if isinstance(model, CifarResNet):
        new = _prune_resnet(model, keep)
    elif isinstance(model, CifarVGG):
        new = _prune_vgg(model, keep)
    else:
        new = _prune_mobilenet(model, keep)
    param = next(model.parameters())
    return new.to(device=param.device, dtype=param.dtype).train(model.training)


def rate_layouts(model: nn.Module) -> list[RateLayout]:
    """The published rate-list layouts of this model (beyond "one entry per set of the scope")."""
    if not isinstance(model, CifarResNet):
        return []
    blocks = _resnet_blocks(model)
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


# ----------------------------------------------------------------------------------------------- ResNet
def _resnet_blocks(model: CifarResNet) -> list[str]:
    return [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(len(getattr(model, f"layer{s}")))]


def _resnet_sets(model: CifarResNet) -> tuple[list[ChannelSet], list[ChannelSet]]:
    inner = [ChannelSet(name=f"{b}.conv1", size=model.get_submodule(f"{b}.conv1").out_channels,
                        producers=(f"{b}.conv1",), tap=f"{b}.conv2", consumers=(f"{b}.conv2",),
                        consumer_norms=(f"{b}.bn2",)) for b in _resnet_blocks(model)]
    streams = [ChannelSet(name="conv1", size=model.stem_width, producers=("conv1",), tap="layer1.0",
                          kind="stream")]
    for s in (1, 2, 3):
        stage = [f"layer{s}.{b}" for b in range(len(getattr(model, f"layer{s}")))]
        streams.append(ChannelSet(name=f"{stage[0]}.conv2", size=model.stage_widths[s - 1],
                                  producers=tuple(f"{b}.conv2" for b in stage), tap=stage[-1],
                                  tap_input=False, kind="stream"))
    return inner, streams


def _shortcut_map(shortcut: nn.Module, in_planes: int) -> list[int]:
    """Output position of every input channel of a block's shortcut (-1: dropped)."""
    return list(shortcut.index) if isinstance(shortcut, PadShortcut) else list(range(in_planes))


def _prune_resnet(model: CifarResNet, keep: dict[str, list[int]]) -> CifarResNet:
    stem = keep["conv1"]
    stages = [keep[f"layer{s}.0.conv2"] for s in (1, 2, 3)]
    blocks = _resnet_blocks(model)
    indices: list[list[int] | None] = []
    for s in range(3):
        first = model.get_submodule(f"layer{s + 1}.0")
        in_keep = stem if s == 0 else stages[s - 1]
        old = _shortcut_map(first.shortcut, first.conv1.in_channels)
        new_pos = {c: i for i, c in enumerate(stages[s])}
        index = [new_pos.get(old[c], -1) for c in in_keep]
        identity = s == 0 and index == list(range(len(stages[0])))
        indices.append(None if identity else index)
    new = CifarResNet(model.depth, num_classes(model), stage_widths=[len(k) for k in stages],
                      mid_widths=[len(keep[f"{b}.conv1"]) for b in blocks], shortcut_indices=indices,
                      stem_width=len(stem))
    _load_layer(new.conv1, model.conv1, out=stem)
    _load_bn(new.bn1, model.bn1, stem)
    in_keep = stem
    for b in blocks:
        mid, out = keep[f"{b}.conv1"], stages[int(b.split(".")[0][len("layer"):]) - 1]
        old, dst = model.get_submodule(b), new.get_submodule(b)
        _load_layer(dst.conv1, old.conv1, out=mid, inp=in_keep)
        _load_bn(dst.bn1, old.bn1, mid)
        _load_layer(dst.conv2, old.conv2, out=out, inp=mid)
        _load_bn(dst.bn2, old.bn2, out)
        in_keep = out
    _load_layer(new.linear, model.linear, inp=in_keep)
    return new


# ----------------------------------------------------------------------------------------------- VGG
def _vgg_convs(model: CifarVGG) -> list[int]:
    return [i for i, w in enumerate(model.cfg) if w != "M"]


def _vgg_sets(model: CifarVGG) -> list[ChannelSet]:
    convs = _vgg_convs(model)
    sets = []
    for i, nxt in zip(convs, convs[1:] + [None]):
        name = f"features.conv{i}"
        # The last conv's map is average-pooled to 1x1 and read by the first linear layer, a per-pixel
        # linear reader of the pooled map, so compensation folds into it like into a 1x1 conv.
        tap, consumer, norm = ((f"features.conv{nxt}", f"features.conv{nxt}", f"features.norm{nxt}")
                               if nxt is not None else ("pool", "classifier.linear1", "classifier.norm1"))
        sets.append(ChannelSet(name=name, size=model.get_submodule(name).out_channels, producers=(name,),
                               tap=tap, consumers=(consumer,), consumer_norms=(norm,)))
    return sets


def _prune_vgg(model: CifarVGG, keep: dict[str, list[int]]) -> CifarVGG:
    cfg = [w if w == "M" else len(keep[f"features.conv{i}"]) for i, w in enumerate(model.cfg)]
    new = CifarVGG(cfg, num_classes(model), model.hidden)
    prev = None
    for i in _vgg_convs(model):
        k = keep[f"features.conv{i}"]
        _load_layer(new.get_submodule(f"features.conv{i}"), model.get_submodule(f"features.conv{i}"), out=k,
                   inp=prev)
        _load_bn(new.get_submodule(f"features.norm{i}"), model.get_submodule(f"features.norm{i}"), k)
        prev = k
    _load_layer(new.classifier.linear1, model.classifier.linear1, inp=prev)
    _load_bn(new.classifier.norm1, model.classifier.norm1, None)
    _load_layer(new.classifier.linear2, model.classifier.linear2)
    return new


# ----------------------------------------------------------------------------------------- MobileNetV2
def _mobilenet_runs(model: CifarMobileNetV2) -> list[list[int]]:
    """Blocks grouped by the stream their outputs share: a non-residual block and the residual blocks
    that add into its output."""
    runs: list[list[int]] = []
    for k, block in enumerate(model.layers):
        if block.residual:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def _mobilenet_reader(model: CifarMobileNetV2, k: int) -> tuple[str, str] | None:
    """(conv, its BatchNorm) that reads block ``k``'s output as a plain 1x1 conv, None if a depthwise
    conv reads it."""
    if k + 1 == len(model.layers):
        return "conv2", "bn2"
    nxt = model.layers[k + 1]
    return (f"layers.{k + 1}.conv1", f"layers.{k + 1}.bn1") if nxt.expand else None


def _hidden_set(name: str, size: int, producers: tuple[str, ...], block: str) -> ChannelSet:
    return ChannelSet(name=name, size=size, producers=producers, tap=f"{block}.conv3",
                      consumers=(f"{block}.conv3",), consumer_norms=(f"{block}.bn3",))


def _mobilenet_sets(model: CifarMobileNetV2) -> tuple[list[ChannelSet], list[ChannelSet]]:
    inner = [_hidden_set(f"layers.{k}.conv1", b.conv1.out_channels, (f"layers.{k}.conv1", f"layers.{k}.conv2"),
                         f"layers.{k}") for k, b in enumerate(model.layers) if b.expand]
    first = model.layers[0]
    if first.expand:  # the stem is then read by block 0's expand conv
        streams = [ChannelSet(name="conv1", size=model.stem, producers=("conv1",), tap="layers.0.conv1",
                              consumers=("layers.0.conv1",), consumer_norms=("layers.0.bn1",))]
    else:  # block 0's depthwise conv works on the stem's channels: they are block 0's hidden channels
        streams = [_hidden_set("conv1", model.stem, ("conv1", "layers.0.conv2"), "layers.0")]
    for run in _mobilenet_runs(model):
        name = f"layers.{run[0]}.conv3"
        producers = tuple(f"layers.{k}.conv3" for k in run)
        size = model.layers[run[0]].conv3.out_channels
        reader = _mobilenet_reader(model, run[-1])
        if len(run) == 1 and reader is not None:
            streams.append(ChannelSet(name=name, size=size, producers=producers, tap=reader[0],
                                      consumers=(reader[0],), consumer_norms=(reader[1],)))
        else:
            streams.append(ChannelSet(name=name, size=size, producers=producers, tap=f"layers.{run[-1]}",
                                      tap_input=False, kind="stream" if len(run) > 1 else "conv"))
    return inner, streams


def _prune_mobilenet(model: CifarMobileNetV2, keep: dict[str, list[int]]) -> CifarMobileNetV2:
    out_keep = {k: keep[f"layers.{run[0]}.conv3"] for run in _mobilenet_runs(model) for k in run}
    hidden, in_keep = [], keep["conv1"]
    for k, block in enumerate(model.layers):
        hidden.append(keep[f"layers.{k}.conv1"] if block.expand else in_keep)
        in_keep = out_keep[k]
    new = CifarMobileNetV2(num_classes(model), stem=len(keep["conv1"]), hidden_widths=[len(h) for h in hidden],
                           out_widths=[len(out_keep[k]) for k in range(len(model.layers))], head=model.head)
    _load_layer(new.conv1, model.conv1, out=keep["conv1"])
    _load_bn(new.bn1, model.bn1, keep["conv1"])
    in_keep = keep["conv1"]
    for k, (old, dst) in enumerate(zip(model.layers, new.layers)):
        if old.expand:
            _load_layer(dst.conv1, old.conv1, out=hidden[k], inp=in_keep)
            _load_bn(dst.bn1, old.bn1, hidden[k])
        _load_layer(dst.conv2, old.conv2, out=hidden[k])  # depthwise: one input channel per filter
        _load_bn(dst.bn2, old.bn2, hidden[k])
        _load_layer(dst.conv3, old.conv3, out=out_keep[k], inp=hidden[k])
        _load_bn(dst.bn3, old.bn3, out_keep[k])
        in_keep = out_keep[k]
    _load_layer(new.conv2, model.conv2, inp=in_keep)
    _load_bn(new.bn2, model.bn2, None)
    _load_layer(new.linear, model.linear)
    return new


# ------------------------------------------------------------------------------------------ weight copy
def _select(t: torch.Tensor, dim: int, idx: Sequence[int] | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))


@torch.no_grad()
def _load_layer(dst: nn.Conv2d | nn.Linear, src: nn.Conv2d | nn.Linear, out: Sequence[int] | None = None,
                inp: Sequence[int] | None = None) -> None:
    """Copy the kept output rows / input columns of a conv or linear layer ([out, in, ...] weight)."""
    dst.weight.copy_(_select(_select(src.weight, 0, out), 1, inp))
    if src.bias is not None:
        dst.bias.copy_(_select(src.bias, 0, out))


@torch.no_grad()
def _load_bn(dst: nn.modules.batchnorm._BatchNorm, src: nn.modules.batchnorm._BatchNorm,
             idx: Sequence[int] | None) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(_select(getattr(src, name), 0, idx))
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
