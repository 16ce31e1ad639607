"""The streaming collector: one pass over the images, every channel set at once, O(sum C^2) memory.

Hooks at each set's ``tap`` hand every batch's maps to one accumulator per requested statistic, which folds
them into running sums and lets them go, so no layer's maps outlive its batch.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..data import ImageSet
from ..loaders import DeviceLoader
from ..types import ChannelSet, LayerStats
from .base import StatRequest, get_statistic


def collect_stats(model: nn.Module, channel_sets: list[ChannelSet], images: ImageSet,
                  requests: set[StatRequest], *, batch_size: int = 128, device: str | torch.device = "cpu",
                  progress: bool = False) -> dict[str, LayerStats]:
    """Per channel set name, the requested statistics of the maps its consumers read, over ``images``.

    The model is moved to ``device`` and run in eval mode without augmentation (its training mode is
    restored afterwards). ``dead`` is always filled. Results are on the CPU, in float64.
    """
    if len(images) == 0:
        raise ValueError("no images to collect statistics on")
    requests = sorted(set(requests) | {StatRequest("dead")}, key=repr)
    device = torch.device(device)
    accumulators = {cs.name: _SetAccumulator(cs, requests) for cs in channel_sets}
    taps: dict[tuple[str, bool], list[_SetAccumulator]] = defaultdict(list)
    for cs in channel_sets:
        taps[cs.tap, cs.tap_input].append(accumulators[cs.name])
    was_training = model.training
    model.to(device).eval()
    handles = [_hook(model, tap, tap_input, group) for (tap, tap_input), group in taps.items()]
    try:
        batches = DeviceLoader(images, batch_size, device=device, train=False)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="collect", unit="batch")
        with torch.inference_mode():
            for x, _ in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for acc in accumulators.values():
        if acc.num_images != len(images):
            raise ValueError(f"tap {acc.cs.tap!r} of channel set {acc.cs.name!r} saw {acc.num_images} maps for "
                             f"{len(images)} images: a tap must run exactly once per forward pass")
    return {name: acc.result() for name, acc in accumulators.items()}


def _hook(model: nn.Module, tap: str, tap_input: bool, group: list["_SetAccumulator"]):
    try:
        module = model.get_submodule(tap)
    except AttributeError:
        raise ValueError(f"channel set tap {tap!r} is not a module of the model") from None

    def feed(maps: torch.Tensor) -> None:
        for acc in group:
            acc.update(maps)

    if tap_input:
        return module.register_forward_pre_hook(lambda _module, args: feed(args[0]))
    return module.register_forward_hook(lambda _module, _args, output: feed(output))


class _SetAccumulator:
    """One channel set's statistics, one accumulator per request."""

    def __init__(self, cs: ChannelSet, requests: list[StatRequest]):
        self.cs = cs
        self.num_images = 0
        self.statistics = {r: get_statistic(r.kind)(r, cs.size) for r in requests}

    def update(self, maps: torch.Tensor) -> None:
        maps = self._as_maps(maps)
        self.num_images += len(maps)
        for statistic in self.statistics.values():
            statistic.update(maps)

    def _as_maps(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps.detach()
        if maps.dim() == 2:                       # a linear consumer reads [N, C]: 1 x 1 maps
            maps = maps[:, :, None, None]
        if maps.dim() != 4 or maps.shape[1] != self.cs.size:
            raise ValueError(f"channel set {self.cs.name!r} has {self.cs.size} channels but its tap "
                             f"{self.cs.tap!r} carries a tensor of shape {tuple(maps.shape)}")
        return maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps

    def result(self) -> LayerStats:
        values: dict[str, torch.Tensor] = {}
        owner: dict[str, StatRequest] = {}
        for request, statistic in self.statistics.items():
            for name, value in statistic.result().items():
                if name in values:
                    raise ValueError(f"statistics {owner[name]} and {request} both yield a value named {name!r}")
                values[name], owner[name] = value, request
        counted = {r.key: s.counted for r, s in self.statistics.items() if r.kind != "dead"}
        return LayerStats(num_images=self.num_images, dead=values.pop("dead"), values=values, counted=counted)
