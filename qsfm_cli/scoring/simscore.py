"""Similarity score: remove the channels most similar, on average, to all others (docs/method.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..types import Order
from .base import SimilarityOptions, checked_dead, register_scorer


def simscore_order(S: torch.Tensor, dead: Iterable[int] = ()) -> tuple[list[int], list[float]]:
    """(removal order, values): dead channels first (ascending, value +inf), then by descending
    score_i = mean over j != i of S[i, j] (ties: larger index first)."""
    sim = torch.as_tensor(S).detach().to("cpu", torch.float64)
    c = sim.shape[0]
    dead = checked_dead(dead, c)
    rows = sim.tolist()
    # exactly rounded sums, so channels with equal scores tie exactly
    score = {i: math.fsum(rows[i][:i] + rows[i][i + 1:]) / (c - 1) if c > 1 else 0.0 for i in range(c)}
    alive = sorted(set(range(c)) - set(dead), key=lambda i: (-score[i], -i))
    return dead + alive, [math.inf] * len(dead) + [score[i] for i in alive]


@register_scorer
@dataclass(frozen=True)
class SimScore(SimilarityOptions):
    """``values``: each channel's score (non-increasing after the dead channels' +inf)."""

    name = "simscore"
    threshold_rule = True

    def order(self, sim: torch.Tensor, dead: list[int]) -> Order:
        removal, values = simscore_order(sim, dead)
        return Order(removal=removal, values=values)
