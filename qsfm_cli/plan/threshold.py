"""The ``threshold`` protocol: each set removes its leading channels whose ``Order.values`` are >= tau."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..types import ChannelSet, Orders
from .base import Counts, PlanContext, Strategy, register_protocol, settle

if TYPE_CHECKING:
    from .spec import PlanSpec


def threshold_counts(tau: float, orders: Orders, sets: list[ChannelSet], min_channels: int = 1,
                     round_to: int = 1) -> Counts:
    """Settled removal counts: per set, the length of the leading run of values >= ``tau``."""
    counts = {}
    for s in sets:
        values = orders[s.name].values
        if values is None:
            raise ValueError(f"a threshold plan needs removal orders with threshold values (Order.values); "
                             f"the order of {s.name!r} has none: choose a scorer with a threshold rule")
        n = next((k for k, v in enumerate(values) if not v >= tau), len(values))
        counts[s.name] = settle(n, s.size, min_channels, round_to)
    return counts


@register_protocol
class Threshold(Strategy):
    name = "threshold"

    def check(self, spec: PlanSpec) -> None:
        if spec.threshold is not None and not math.isfinite(spec.threshold):
            raise ValueError(f"prune.threshold={spec.threshold}; accepted: a finite number")

    def uses_threshold(self, spec: PlanSpec) -> bool:
        return True

    def counts(self, ctx: PlanContext) -> tuple[Counts, dict[str, Any]]:
        spec = ctx.spec
        return threshold_counts(spec.threshold, ctx.orders, ctx.sets, spec.min_channels, spec.round_to), {}
