"""HRank (Lin et al. 2020): remove first the channels whose maps have the lowest mean matrix rank
(collected by ``qsfm_cli.collect.rank``)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import StatisticScorer, register_scorer


@register_scorer
@dataclass(frozen=True)
class HRank(StatisticScorer):
    name = "hrank"
    stat = "rank"
