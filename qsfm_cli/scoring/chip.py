"""CHIP (Sui et al. 2021): remove first the channels with the lowest mean channel independence,
CI_c = ||A||_* - ||A with row c zeroed||_* for the C x HW matrix A of one image's maps (collected by
``qsfm_cli.collect.chip``)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import StatisticScorer, register_scorer


@register_scorer
@dataclass(frozen=True)
class CHIP(StatisticScorer):
    name = "chip"
    stat = "chip"
