"""L1 norm of filters (Li et al. 2017): remove the channels with the smallest sum of |weights| first."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FilterScorer, register_scorer


@register_scorer
@dataclass(frozen=True)
class L1(FilterScorer):
    name = "l1"

    def importance(self, filters: torch.Tensor) -> torch.Tensor:
        return filters.abs().sum(1)
