"""Score stage: the scorer's removal orders from collected statistics, cached by content."""
from __future__ import annotations

from dataclasses import asdict

from torch import nn

from ..cache import RunContext, fingerprint
from ..types import ChannelSet, LayerStats, Order, Orders
from .base import Scorer


def score_stage(model: nn.Module, sets: list[ChannelSet], stats: dict[str, LayerStats], scorer: Scorer,
                ctx: RunContext, *, key: str, status: str = "orders") -> tuple[Orders, str]:
    """The orders of ``scorer`` and their cache key, derived from ``key`` (what the statistics depend on,
    ``collect.content_key``) and the scorer's name, options and requests; the cache status goes under
    ``status``."""
    orders_key = fingerprint("orders", key, sorted(map(repr, scorer.requests())), scorer.name, scorer.options())

    def score() -> dict[str, dict]:
        return {name: asdict(o) for name, o in scorer.score(model, sets, stats).items()}

    raw = ctx.cached("orders", orders_key, score, status=status)
    return {name: Order(**d) for name, d in raw.items()}, orders_key
