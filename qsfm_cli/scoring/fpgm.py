"""FPGM (He et al. 2019): remove first the filters nearest the geometric median of their layer, i.e. with
the smallest sum of Euclidean distances to all other filters."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FilterScorer, register_scorer


@register_scorer
@dataclass(frozen=True)
class FPGM(FilterScorer):
    name = "fpgm"

    def importance(self, filters: torch.Tensor) -> torch.Tensor:
        # exact pairwise differences, not the |a|^2 + |b|^2 - 2ab expansion: near-identical filters
        # then get exactly equal distances, and tie
        return torch.cdist(filters, filters, compute_mode="donot_use_mm_for_euclid_dist").sum(1)
