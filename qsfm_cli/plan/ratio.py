"""The ``ratio`` protocol, the default: every set of the scope loses floor(ratio * C) of its C channels."""
from __future__ import annotations

from typing import Any

from ..types import ChannelSet
from .base import Counts, PlanContext, Strategy, register_protocol, removed_count, settle


def ratio_counts(ratio: float, sets: list[ChannelSet], min_channels: int = 1, round_to: int = 1) -> Counts:
    """Settled removal counts of one ratio applied to every set."""
    return {s.name: settle(removed_count(ratio, s.size), s.size, min_channels, round_to) for s in sets}


@register_protocol
class Ratio(Strategy):
    name = "ratio"
    default = True

    def counts(self, ctx: PlanContext) -> tuple[Counts, dict[str, Any]]:
        spec = ctx.spec
        return ratio_counts(spec.ratio, ctx.sets, spec.min_channels, spec.round_to), {}
