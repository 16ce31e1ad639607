"""HRank's statistic: the mean matrix rank of each channel's H x W map."""
from __future__ import annotations

import torch

from .base import MeanStatistic, register_statistic


def map_ranks(maps: torch.Tensor) -> torch.Tensor:
    """[N, C]: the matrix rank of every H x W map, with torch's default tolerance (as HRank)."""
    return torch.linalg.matrix_rank(maps)


@register_statistic
class Rank(MeanStatistic):
    """``rank``: [C] mean matrix rank of each channel's map."""

    kind = "rank"

    def batch_sums(self, maps: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        return {"rank": map_ranks(maps).sum(0, dtype=torch.float64)}, len(maps)
