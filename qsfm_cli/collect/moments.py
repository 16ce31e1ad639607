"""First and second moments of the maps, from which compensation fits removed maps on kept ones."""
from __future__ import annotations

import torch

from .base import MeanStatistic, register_statistic


@register_statistic
class Moments(MeanStatistic):
    """``mean``: [C] mean of each map over images and pixels; ``gram``: [C, C] mean of F_i * F_j over
    images and pixels (covariance = gram - mean mean^T)."""

    kind = "moments"

    def batch_sums(self, maps: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        flat = maps.flatten(2).double()
        return {"mean": flat.mean(2).sum(0),
                "gram": torch.bmm(flat, flat.transpose(1, 2)).sum(0) / flat.shape[2]}, len(maps)
