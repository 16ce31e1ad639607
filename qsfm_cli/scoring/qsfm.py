"""QSFM: greedy removal of the most redundant channel of the most similar pair (docs/method.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from ..types import Order
from .base import SimilarityOptions, checked_dead, register_scorer


def qsfm_order(S: torch.Tensor, dead: Iterable[int] = ()) -> tuple[list[int], list[int]]:
    """QSFM's removal order and twins: ``twins[k]`` is the kept partner of ``order[k]`` (-1 for dead).

    Dead channels first (ascending); then, until one channel remains, the pair i < j of remaining channels
    with the largest S[i, j] (ties: the lexicographically smallest pair) loses the channel with the larger
    mean S to the other remaining channels (tie: the larger index).
    """
    order, twins, _ = qsfm_steps(S, dead)
    return order, twins


def qsfm_steps(S: torch.Tensor, dead: Iterable[int] = ()) -> tuple[list[int], list[int], list[float]]:
    """``qsfm_order`` plus, per removal, the S of the chosen pair (``+inf`` for dead channels)."""
    sim = np.asarray(torch.as_tensor(S).detach().to("cpu", torch.float64))
    c = sim.shape[0]
    if sim.shape != (c, c):
        raise ValueError(f"S must be a square matrix, got shape {tuple(sim.shape)}")
    dead = checked_dead(dead, c)
    order, twins, values = list(dead), [-1] * len(dead), [math.inf] * len(dead)
    remaining = np.ones(c, dtype=bool)
    remaining[dead] = False
    # candidates[i, j]: S of a remaining pair i < j, -inf otherwise; row-major argmax = smallest pair on ties
    candidates = np.where(np.triu(np.ones((c, c), dtype=bool), 1), sim, -np.inf)
    candidates[~remaining, :] = -np.inf
    candidates[:, ~remaining] = -np.inf
    for _ in range(int(remaining.sum()) - 1):
        i, j = divmod(int(np.argmax(candidates)), c)
        # same denominator for both, so compare exactly rounded sums: equal means tie exactly
        sum_i = math.fsum(sim[i, remaining & (np.arange(c) != i)])
        sum_j = math.fsum(sim[j, remaining & (np.arange(c) != j)])
        removed, kept = (i, j) if sum_i > sum_j else (j, i)
        order.append(removed)
        twins.append(kept)
        values.append(float(sim[i, j]))
        remaining[removed] = False
        candidates[removed, :] = -np.inf
        candidates[:, removed] = -np.inf
    return order, twins, values


@register_scorer
@dataclass(frozen=True)
class QSFM(SimilarityOptions):
    """``values[k]``: S of the pair behind the k-th removal (non-increasing); the last channel (the
    survivor) is listed last with value -inf, so ``removal`` is a full permutation."""

    name = "qsfm"
    threshold_rule = True

    def order(self, sim: torch.Tensor, dead: list[int]) -> Order:
        order, twins, values = qsfm_steps(sim, dead)
        survivors = sorted(set(range(sim.shape[0])) - set(order))
        return Order(removal=order + survivors, values=values + [-math.inf] * len(survivors),
                     twins=twins + [-1] * len(survivors))
