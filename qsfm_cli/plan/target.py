"""The ``target_macs_reduction`` protocol: remove a given fraction of the MACs.

``allocation`` says how the channels are spread: ``uniform`` searches one ratio for every set,
``threshold`` one global threshold on the scorer's ``Order.values``, ``sensitivity`` chooses per-set
ratios from a sensitivity table (``sensitivity.py``). Every count is settled by ``min_channels`` and
``round_to`` before its MACs are counted, so the search lands on the target with them in force.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from .base import _EPS, Counts, PlanContext, Strategy, register_protocol, step_up
from .ratio import ratio_counts
from .sensitivity import sensitivity_counts
from .threshold import threshold_counts

if TYPE_CHECKING:
    from .spec import PlanSpec

ALLOCATIONS = ("uniform", "threshold", "sensitivity")
TOLERANCE = 0.005          # how close a searched MACs reduction must come to its target (0.5 pp)


@register_protocol
class Target(Strategy):
    name = "target_macs_reduction"

    def check(self, spec: PlanSpec) -> None:
        if spec.target_macs_reduction is not None and not 0 < spec.target_macs_reduction < 1:
            raise ValueError(f"prune.target_macs_reduction={spec.target_macs_reduction}; accepted: a number in (0, 1)")
        if spec.allocation not in ALLOCATIONS:
            raise ValueError(f"prune.allocation={spec.allocation}; accepted: {', '.join(ALLOCATIONS)}")
        if spec.allocation != "uniform" and spec.target_macs_reduction is None and spec.target_speedup is None:
            raise ValueError(f"prune.allocation={spec.allocation} needs prune.target_macs_reduction or "
                             "prune.target_speedup")
        params = spec.target_params_reduction
        if params is not None and not 0 < params < 1:
            raise ValueError(f"prune.target_params_reduction={params}; accepted: a number in (0, 1)")
        if params is not None and (spec.allocation != "sensitivity" or spec.target_macs_reduction is None):
            raise ValueError("prune.target_params_reduction needs prune.allocation=sensitivity and "
                             "prune.target_macs_reduction (the parameters are priced in the allocation)")

    def uses_threshold(self, spec: PlanSpec) -> bool:
        return spec.allocation == "threshold"

    def needs_sensitivity(self, spec: PlanSpec) -> bool:
        return spec.allocation == "sensitivity"

    def counts(self, ctx: PlanContext) -> tuple[Counts, dict[str, Any]]:
        ctx.needs_model()
        if ctx.spec.allocation == "sensitivity":
            return sensitivity_counts(ctx, TOLERANCE)
        return search_counts(ctx)


def search_counts(ctx: PlanContext) -> tuple[Counts, dict[str, Any]]:
    """The uniform ratio (or global threshold) whose MACs reduction is closest to the target.

    Both are step functions: between two neighbouring steps several sets change at once (a uniform
    ratio moves every set of one width together), which can jump by several percentage points. The jump
    is then resolved set by set: the first sets, in forward order, take the next step's count, as many
    as bring the reduction closest to the target. Where that misses the tolerance (coarse steps, as
    ``round_to`` makes them: one set's step can be worth a point or two), any set may instead remove one
    step more than the lower setting gives it (``_raised``); the record then names them in
    ``raised_sets``.
    """
    spec, sets, orders = ctx.spec, ctx.sets, ctx.orders
    bounds = (spec.min_channels, spec.round_to)
    if spec.allocation == "uniform":
        steps = sorted({k / s.size for s in sets for k in range(s.size)})[1:] + [1.0 - _EPS]
        counts_at: Callable[[float], Counts] = lambda r: ratio_counts(r, sets, *bounds)  # noqa: E731
        start, key = counts_at(0.0), "ratio"
    else:
        start = threshold_counts(math.inf, orders, sets, *bounds)  # dead channels only
        steps = sorted({v for s in sets for v in orders[s.name].values if math.isfinite(v)}, reverse=True)
        if not steps:
            raise ValueError("prune.allocation=threshold needs finite threshold values (Order.values); the "
                             "scorer gave none: use prune.allocation=uniform")
        counts_at = lambda t: threshold_counts(t, orders, sets, *bounds)  # noqa: E731
        key = "threshold"
    meter, cache = ctx.meter(), {}

    def reduction(counts: Counts) -> float:
        k = tuple(counts.values())
        if k not in cache:
            cache[k] = meter.reduction(ctx.pruned(counts))
        return cache[k]

    target = spec.target_macs_reduction
    top = counts_at(steps[-1])
    if reduction(top) < target - TOLERANCE:
        rounding = f", round_to={spec.round_to}" if spec.round_to > 1 else ""
        raise ValueError(f"prune.target_macs_reduction={target} cannot be reached: pruning with {key}={steps[-1]:.4g} "
                         f"(min_channels={spec.min_channels}{rounding}) removes only {100 * reduction(top):.2f}% "
                         "of the MACs")
    i = _first(len(steps), lambda i: reduction(counts_at(steps[i])) >= target)
    lower, upper = (counts_at(steps[i - 1]) if i > 0 else start), counts_at(steps[i])
    moving = [s.name for s in sets if upper[s.name] != lower[s.name]]
    with_next = lambda names: {**lower, **{n: upper[n] for n in names}}  # noqa: E731
    k = _first(len(moving) + 1, lambda k: reduction(with_next(moving[:k])) >= target)
    if k > 0 and abs(reduction(with_next(moving[:k - 1])) - target) < abs(reduction(with_next(moving[:k])) - target):
        k -= 1
    counts = with_next(moving[:k])
    below = steps[i - 1] if i > 0 else (0.0 if key == "ratio" else None)  # None: above every value
    found: dict[str, Any] = {key: steps[i] if k == len(moving) else below}
    if 0 < k < len(moving):
        found.update(next_step=steps[i], next_step_sets=moving[:k])
    if abs(reduction(counts) - target) > TOLERANCE:
        raised = _raised(ctx, lower, reduction, target)
        if abs(reduction(raised) - target) < abs(reduction(counts) - target):
            counts = raised
            found = {key: below, "raised_sets": [n for n in lower if raised[n] != lower[n]]}
    found.update(target_macs_reduction=target, macs_reduction=reduction(counts), evaluations=len(cache))
    if abs(found["macs_reduction"] - target) > TOLERANCE:
        found["note"] = (f"no {key} comes within {100 * TOLERANCE:.1f} pp of the target; closest reached "
                         f"{100 * found['macs_reduction']:.2f}%")
    return counts, found


def _raised(ctx: PlanContext, lower: Counts, reduction: Callable[[Counts], float], target: float) -> Counts:
    """``lower`` with some sets removing one step more (``step_up``), chosen by their own saving, largest
    first, while the reduction stays at or below ``target``; then the one more step that lands closest."""
    spec = ctx.spec
    ups = {s.name: up for s in ctx.sets
           if (up := step_up(lower[s.name], s.size, spec.min_channels, spec.round_to)) is not None}
    base = reduction(lower)
    saving = {n: reduction({**lower, n: up}) - base for n, up in ups.items()}
    counts = dict(lower)
    for name in sorted(ups, key=lambda n: -saving[n]):
        if reduction({**counts, name: ups[name]}) <= target:
            counts[name] = ups[name]
    options = [counts] + [{**counts, n: up} for n, up in ups.items() if counts[n] != up]
    return min(options, key=lambda c: abs(reduction(c) - target))


def _first(n: int, reaches: Callable[[int], bool]) -> int:
    """Smallest i in [0, n) with reaches(i), for a monotone predicate that holds at n - 1."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
