"""Dead channels: those whose map is constant on every image. Always collected (``LayerStats.dead``): the
similarity scorers remove them first, whatever they asked for."""
from __future__ import annotations

import torch

from .base import Statistic, register_statistic


def constant_channels(maps: torch.Tensor) -> torch.Tensor:
    """[N, C] bool: the map of channel c on image n is constant (max == min)."""
    flat = maps.flatten(2)
    return flat.amax(2) == flat.amin(2)


@register_statistic
class Dead(Statistic):
    """``dead``: [C] bool, true where the channel's map was constant on every image."""

    kind = "dead"

    def __init__(self, request, channels: int):
        super().__init__(request, channels)
        self.alive: torch.Tensor | None = None

    def update(self, maps: torch.Tensor) -> None:
        alive = (~constant_channels(maps)).any(0)
        self.alive = alive if self.alive is None else self.alive | alive
        self.counted += len(maps)

    def result(self) -> dict[str, torch.Tensor]:
        return {"dead": ~self.alive.cpu()}
