"""Random order: the baseline every criterion must beat. The same seed gives the same order."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..types import ChannelSet, LayerStats, Order
from .base import ScorerOptions, register_scorer


@register_scorer
@dataclass(frozen=True)
class Random(ScorerOptions):
    seed: int = 0
    name = "random"


    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        return {cs.name: Order(removal=torch.randperm(cs.size, generator=self._generator(cs.name)).tolist())
                for cs in channel_sets}

    def _generator(self, set_name: str) -> torch.Generator:
        # one stream per set, independent of the other sets and of the order they come in
        digest = hashlib.sha256(f"{self.seed}/{set_name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
