"""HRank (Lin et al. 2020): remove first the channels whose maps have the lowest mean matrix rank."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..types import ChannelSet, LayerStats, Order
from . import register_scorer
from .base import ScorerOptions, StatRequest, ascending_order, collected


def map_ranks(maps: torch.Tensor) -> torch.Tensor:
    """[N, C]: the matrix rank of every H x W map, with torch's default tolerance (as HRank)."""
    return torch.linalg.matrix_rank(maps)


@register_scorer
@dataclass(frozen=True)
class HRank(ScorerOptions):
    name = "hrank"

    def requests(self) -> set[StatRequest]:
        return {StatRequest.rank()}

    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        return {cs.name: ascending_order(collected(cs, stats, "rank")) for cs in channel_sets}
