"""A new architecture family, added by docs/extending.md's steps alone ("Adding an architecture family"):
a model constructor and its adapter, registered through the public functions, then pruned and repaired by
the recoveries that walk the network block by block, which learn its blocks and shortcuts from the
adapter."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsfm_cli.models import create_model, register_model
from qsfm_cli.pruning import (Block, apply_keep, architecture, block_of, blocks, build_model, channel_sets,
                              register_adapter, shortcut, stream_blocks)
from qsfm_cli.pruning import base
from qsfm_cli.pruning.base import WidthsAdapter, check_width, check_widths, load_bn, load_layer, on_device_of
from qsfm_cli.recover import get_recovery
from qsfm_cli.types import ChannelSet, Keep

from .test_recover import as_float, calibrated, half_keep, images, relative_error


class ToyBlock(nn.Module):
    def __init__(self, width: int, mid: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class ToyResNet(nn.Module):
    """A stem, two residual blocks on one stream, a pooled linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 8, mids: Sequence[int] = (6, 6)):
        super().__init__()
        self.width, self.mids = width, list(mids)
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*(ToyBlock(width, m) for m in self.mids))
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.linear(x.mean((2, 3)))

    def widths(self) -> dict:
        return {"width": self.width, "mids": self.mids}


def toy_resnet(num_classes: int = 10, **kwargs) -> ToyResNet:
    return ToyResNet(num_classes=num_classes, **kwargs)


class ToyAdapter(WidthsAdapter):
    classifier = "linear"

    def registry_name(self, model: ToyResNet) -> str:
        return "toy_resnet"

    def channel_sets(self, model: ToyResNet, example_input: torch.Tensor, scope: str) -> list[ChannelSet]:
        n = len(model.mids)
        inner = [ChannelSet(name=f"blocks.{i}.conv1", size=m, producers=(f"blocks.{i}.conv1",),
                            tap=f"blocks.{i}.conv2", consumers=(f"blocks.{i}.conv2",),
                            consumer_norms=(f"blocks.{i}.bn2",)) for i, m in enumerate(model.mids)]
        if scope == "default":
            return inner
        stream = ChannelSet(name="stem", size=model.width,
                            producers=("stem", *(f"blocks.{i}.conv2" for i in range(n))),
                            tap=f"blocks.{n - 1}", tap_input=False, kind="stream")
        return [stream, *inner]

    def blocks(self, model: ToyResNet) -> list[Block]:
        return [Block(f"blocks.{i}", adds_to=f"blocks.{i}.conv2") for i in range(len(model.mids))]

    def apply_keep(self, model: ToyResNet, keep: Keep, example_input: torch.Tensor) -> ToyResNet:
        stream = keep["stem"]
        mids = [keep[f"blocks.{i}.conv1"] for i in range(len(model.mids))]
        new = ToyResNet(self.num_classes(model), width=len(stream), mids=[len(m) for m in mids])
        load_layer(new.stem, model.stem, out=stream)
        load_bn(new.bn, model.bn, stream)
        for old, dst, mid in zip(model.blocks, new.blocks, mids):
            load_layer(dst.conv1, old.conv1, out=mid, inp=stream)
            load_bn(dst.bn1, old.bn1, mid)
            load_layer(dst.conv2, old.conv2, out=stream, inp=mid)
            load_bn(dst.bn2, old.bn2, stream)
        load_layer(new.linear, model.linear, inp=stream)
        return on_device_of(new, model)

    def check_widths(self, widths: Mapping[str, Any], original: ToyResNet) -> None:
        check_width("kwargs.width", widths.get("width", original.width), original.width)
        check_widths("kwargs.mids", widths.get("mids", original.mids), original.mids)


@pytest.fixture
def toy_family(monkeypatch, scratch_models):
    """The toy family registered by the public functions, for this test only."""
    monkeypatch.setattr(base, "_ADAPTERS", dict(base._ADAPTERS))
    register_model(toy_resnet)
    register_adapter(ToyResNet)(ToyAdapter)


def test_the_adapter_tells_blocks_shortcuts_and_streams(toy_family):
    model = create_model("toy_resnet")
    x = torch.zeros(1, 3, 8, 8)
    assert [b.path for b in blocks(model)] == ["blocks.0", "blocks.1"]
    assert block_of(model, "blocks.1.conv1") == ("blocks.1",)
    assert block_of(model, "stem") == ("stem",)
    assert isinstance(shortcut(model, "blocks.0", "blocks.0.conv2"), nn.Identity)
    assert shortcut(model, "blocks.0", "blocks.0.conv1") is None
    sets = {s.name: s for s in channel_sets(model, x, "stage")}
    assert [b.path for b in stream_blocks(model, sets["stem"])] == ["blocks.0", "blocks.1"]
    assert [b.path for b in stream_blocks(model, sets["blocks.1.conv1"])] == ["blocks.1"]


@pytest.mark.parametrize("method, options", [("sequential", {}), ("blockwise", {"steps": 20})])
def test_a_new_family_is_pruned_and_reconstructed_block_by_block(toy_family, method, options):
    data = images(16, size=8)
    torch.manual_seed(0)
    model = calibrated(create_model("toy_resnet"), data)
    x = as_float(data)
    sets, keep = half_keep(model, x[:1], "stage")
    pruned = apply_keep(model, keep, x[:1])
    assert build_model(architecture(pruned)).widths() == {"width": 4, "mids": [3, 3]}
    before = relative_error(pruned, model, x)
    recovery = get_recovery(method, batch_size=8, positions=16, **options).method
    status = {name: str(done) for name, done in recovery.refit(model, pruned, sets, keep, data, seed=0).items()}
    assert status["stem"].startswith("skipped: its map is not read by plain conv/linear layers")
    for name in ("blocks.0.conv1", "blocks.1.conv1"):
        assert status[name].startswith("refit"), status[name]
        if method == "blockwise":   # the adapter's block was tuned as a whole
            assert f"block {name.rsplit('.', 1)[0]} " in status[name] or \
                f"block {name.rsplit('.', 1)[0]}:" in status[name]
    assert relative_error(pruned, model, x) < before
