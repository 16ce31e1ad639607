"""HRank (Lin et al. 2020): remove first the channels whose maps have the lowest mean matrix rank."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_scorer
from .base import StatisticScorer


def map_ranks(maps: torch.Tensor) -> torch.Tensor:
    """[N, C]: the matrix rank of every H x W map, with torch's default tolerance (as HRank)."""
    return torch.linalg.matrix_rank(maps)


@register_scorer
@dataclass(frozen=True)
class HRank(StatisticScorer):
    name = "hrank"
    stat = "rank"
