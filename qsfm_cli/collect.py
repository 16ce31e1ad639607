"""The streaming collector: one pass over the images, every channel set at once, O(sum C^2) memory.

Hooks at each set's ``tap`` hand every batch's maps to an accumulator that folds them into running sums
and lets them go, so no layer's maps outlive its batch.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .data import ImageSet
from .loaders import DeviceLoader
from .scoring.base import StatRequest
from .scoring.chip import channel_independence
from .scoring.hrank import map_ranks
from .scoring.similarity import constant_channels, similarity_sums
from .types import ChannelSet, LayerStats


def collect_stats(model: nn.Module, channel_sets: list[ChannelSet], images: ImageSet,
                  requests: set[StatRequest], *, batch_size: int = 128, device: str | torch.device = "cpu",
                  progress: bool = False) -> dict[str, LayerStats]:
    """Per channel set name, the requested statistics of the maps its consumers read, over ``images``.

    The model is moved to ``device`` and run in eval mode without augmentation (its training mode is
    restored afterwards). ``dead`` is always filled. Results are on the CPU, in float64.
    """
    if len(images) == 0:
        raise ValueError("no images to collect statistics on")
    device = torch.device(device)
    accumulators = {cs.name: _LayerAccumulator(cs, requests) for cs in channel_sets}
    taps: dict[tuple[str, bool], list[_LayerAccumulator]] = defaultdict(list)
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


def _hook(model: nn.Module, tap: str, tap_input: bool, group: list["_LayerAccumulator"]):
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


class _LayerAccumulator:
    """Running sums of one channel set's statistics; float64 so that long runs do not drift."""

    def __init__(self, cs: ChannelSet, requests: set[StatRequest]):
        self.cs = cs
        self.kinds = {r.kind for r in requests}
        self.similarity = [r for r in requests if r.kind == "similarity"]
        self.num_images = 0
        self.counted = {r: 0 for r in self.similarity}
        self.sums: dict[str | StatRequest, torch.Tensor] = {}
        self.alive: torch.Tensor | None = None

    def update(self, maps: torch.Tensor) -> None:
        maps = self._as_maps(maps)
        self.num_images += len(maps)
        alive = (~constant_channels(maps)).any(0)
        self.alive = alive if self.alive is None else self.alive | alive
        for request in self.similarity:
            total, counted = similarity_sums(maps, request.metric, **dict(request.params))
            self._add(request, total)
            self.counted[request] += counted
        if "rank" in self.kinds:
            self._add("rank", map_ranks(maps).sum(0, dtype=torch.float64))
        if "chip" in self.kinds:
            self._add("chip", channel_independence(maps).sum(0))
        if "moments" in self.kinds:
            flat = maps.flatten(2).double()
            self._add("mean", flat.mean(2).sum(0))
            self._add("gram", torch.bmm(flat, flat.transpose(1, 2)).sum(0) / flat.shape[2])

    def _add(self, key: str | StatRequest, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def _as_maps(self, maps: torch.Tensor) -> torch.Tensor:
        maps = maps.detach()
        if maps.dim() == 2:                       # a linear consumer reads [N, C]: 1 x 1 maps
            maps = maps[:, :, None, None]
        if maps.dim() != 4 or maps.shape[1] != self.cs.size:
            raise ValueError(f"channel set {self.cs.name!r} has {self.cs.size} channels but its tap "
                             f"{self.cs.tap!r} carries a tensor of shape {tuple(maps.shape)}")
        return maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps

    def result(self) -> LayerStats:
        mean_of = {k: v.cpu() / self.num_images for k, v in self.sums.items() if isinstance(k, str)}
        return LayerStats(
            num_images=self.num_images,
            dead=~self.alive.cpu(),
            similarity={r.key: self.sums[r].cpu() / max(self.counted[r], 1) for r in self.similarity},
            counted={r.key: self.counted[r] for r in self.similarity},
            mean=mean_of.get("mean"), gram=mean_of.get("gram"), rank=mean_of.get("rank"), chip=mean_of.get("chip"),
        )
