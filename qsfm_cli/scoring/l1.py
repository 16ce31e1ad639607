"""L1 norm of filters (Li et al. 2017): remove the channels with the smallest sum of |weights| first."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..types import ChannelSet, LayerStats, Order
from . import register_scorer
from .base import ScorerOptions, ascending_order, producer_filters


@register_scorer
@dataclass(frozen=True)
class L1(ScorerOptions):
    name = "l1"


    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        return {cs.name: ascending_order(producer_filters(model, cs).abs().sum(1)) for cs in channel_sets}
