"""FPGM (He et al. 2019): remove first the filters nearest the geometric median of their layer, i.e. with
the smallest sum of Euclidean distances to all other filters."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..types import ChannelSet, LayerStats, Order
from . import register_scorer
from .base import ScorerOptions, ascending_order, producer_filters


@register_scorer
@dataclass(frozen=True)
class FPGM(ScorerOptions):
    name = "fpgm"


    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        orders = {}
        for cs in channel_sets:
            filters = producer_filters(model, cs)
            # exact pairwise differences, not the |a|^2 + |b|^2 - 2ab expansion: near-identical filters
            # then get exactly equal distances, and tie
            dist = torch.cdist(filters, filters, compute_mode="donot_use_mm_for_euclid_dist")
            orders[cs.name] = ascending_order(dist.sum(1))
        return orders
