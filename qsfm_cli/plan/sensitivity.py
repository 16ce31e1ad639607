"""The sensitivity table and the allocation that reads it (``allocation=sensitivity`` of a MACs target).

Each set is pruned alone at every ratio of a grid; the table holds the loss increase (measured by an
injected ``loss_of``: the planner loads no data) and the fraction of MACs saved. The allocation then
chooses per-set ratios that reach the target with the least summed loss increase.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..counting import MacsMeter, count_params
from ..types import ChannelSet, Keep, Orders
from .base import Counts, PlanContext, keep_from_counts, removed_count, settle

if TYPE_CHECKING:
    from .spec import PlanSpec


def measure_sensitivity(sets: list[ChannelSet], orders: Orders, grid: Sequence[float],
                        prune_fn: Callable[[Keep], nn.Module], loss_of: Callable[[nn.Module], float],
                        meter: MacsMeter, min_channels: int = 1, *, round_to: int = 1,
                        progress: bool = False) -> dict[str, Any]:
    """Per set, the loss increase and the fractions of MACs and parameters saved when only that set is
    pruned at each ratio of ``grid``, its count settled by ``min_channels`` and ``round_to`` as the plan settles it.
    An entry is ``None`` where the ratio removes nothing, or nothing more than a smaller ratio of the grid
    already does. ``progress`` shows a bar: the table takes one loss evaluation per entry."""
    removed = {}
    for s in sets:
        row, last = [], 0
        for ratio in grid:
            n = settle(removed_count(ratio, s.size), s.size, min_channels, round_to)
            row.append(n if n > last else None)
            last = max(last, n)
        removed[s.name] = row
    layers = {}
    with tqdm(total=1 + sum(n is not None for row in removed.values() for n in row), desc="sensitivity",
              leave=False, disable=not progress, dynamic_ncols=True) as bar:
        unpruned = prune_fn({})
        base_loss, base_params = loss_of(unpruned), count_params(unpruned)
        bar.update()
        for s in sets:
            loss_increase, macs_saved, params_saved = [], [], []
            for n in removed[s.name]:
                if n is None:
                    for row in (loss_increase, macs_saved, params_saved):
                        row.append(None)
                    continue
                pruned = prune_fn(keep_from_counts(orders, [s], {s.name: n}))
                loss_increase.append(loss_of(pruned) - base_loss)
                macs_saved.append(meter.reduction(pruned))
                params_saved.append(1.0 - count_params(pruned) / base_params)
                bar.update()
            layers[s.name] = {"removed": removed[s.name], "loss_increase": loss_increase,
                              "macs_saved": macs_saved, "params_saved": params_saved}
    return {"grid": list(grid), "base_loss": base_loss, "min_channels": min_channels, "round_to": round_to,
            "layers": layers}


def format_sensitivity(table: Mapping[str, Any]) -> str:
    """The sensitivity table as aligned text: one row per set, loss increase per ratio."""
    grid = table["grid"]
    width = max(len(name) for name in table["layers"])
    lines = [f"loss increase over {table['base_loss']:.4f} when one set alone is pruned",
             f"{'set':<{width}}  " + "  ".join(f"{r:>7.2f}" for r in grid)]
    for name, row in table["layers"].items():
        cells = ["      -" if v is None else f"{v:>7.4f}" for v in row["loss_increase"]]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def allocate(table: Mapping[str, Any], names: list[str], target: float, resolution: float = 5e-4,
             params_weight: float = 0.0) -> dict[str, float] | None:
    """Per-set ratios of least summed cost whose summed MACs savings reach ``target``; None when the grid
    cannot reach it. An entry's cost is its loss increase minus ``params_weight`` times the fraction of
    parameters it saves (0: the loss alone)."""
    options = {}
    for name in names:
        row = table["layers"][name]
        params = row.get("params_saved") or [0.0] * len(table["grid"])
        options[name] = [(0.0, 0.0, 0.0)] + [(r, s, c - params_weight * p) for r, s, c, p in
                                             zip(table["grid"], row["macs_saved"], row["loss_increase"], params)
                                             if c is not None]
    return least_cost(options, target, resolution)


def least_cost(options: Mapping[str, Sequence[tuple[Any, float, float]]], need: float, resolution: float
               ) -> dict[str, Any] | None:
    """One option ``(value, gain, cost)`` per name: the choice of least summed cost whose summed gain
    reaches ``need`` (a knapsack over the gains, discretized to ``resolution``), as name -> value; None
    when no choice reaches it."""
    bins = max(1, math.ceil(need / resolution))
    at = np.arange(bins + 1)
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    trace = []
    for choices in options.values():
        binned = [(value, max(0, round(gain / resolution)), cost) for value, gain, cost in choices]
        new = np.full(bins + 1, np.inf)
        pick = np.zeros(bins + 1, dtype=np.int64)
        prev = np.zeros(bins + 1, dtype=np.int64)
        for k, (_, saved, cost) in enumerate(binned):
            # every state b moves to min(bins, b + saved): the last bin takes the best of its sources
            source = at - saved
            candidate = np.where(source >= 0, best[np.maximum(source, 0)] + cost, np.inf)
            low = max(0, bins - saved)
            source[bins] = low + int(np.argmin(best[low:]))
            candidate[bins] = best[source[bins]] + cost
            better = candidate < new
            new[better], pick[better], prev[better] = candidate[better], k, source[better]
        trace.append((binned, pick, prev))
        best = new
    if not np.isfinite(best[bins]):
        return None
    chosen, b = {}, bins
    for name, (binned, pick, prev) in zip(reversed(list(options)), reversed(trace)):
        chosen[name] = binned[pick[b]][0]
        b = prev[b]
    return chosen


def sensitivity_counts(ctx: PlanContext, tolerance: float) -> tuple[Counts, dict[str, Any]]:
    """Allocate by the table (measured here unless ``ctx.sensitivity`` holds one), then correct the target
    the allocation aims at until the real MACs reduction (savings of several pruned sets do not simply
    add up) is within ``tolerance``. With ``target_params_reduction``, a price on the parameters each
    entry keeps is raised (``_priced``) until the allocation also removes that fraction of the parameters."""
    spec, sets = ctx.spec, ctx.sets
    if ctx.loss_of is None and ctx.sensitivity is None:
        raise ValueError("prune.allocation=sensitivity needs loss_of, how far a pruned copy moved on held-out "
                         "images (qsfm_cli.evaluate.divergence_from)")
    table = ctx.sensitivity
    if table is None:
        table = measure_sensitivity(sets, ctx.orders, spec.sensitivity_grid, ctx.pruner(), ctx.loss_of,
                                    ctx.meter(), spec.min_channels, round_to=spec.round_to, progress=ctx.progress)
    _check_table(table, sets, spec)
    target = spec.target_macs_reduction
    names = [s.name for s in sets]
    found: dict[str, Any] = {"sensitivity": table, "target_macs_reduction": target}
    if spec.target_params_reduction is None:
        chosen = _reach_macs(ctx, table, names, tolerance, 0.0)
    else:
        chosen = _priced(ctx, table, names, tolerance, spec.target_params_reduction)
        found.update(target_params_reduction=spec.target_params_reduction, params_reduction=chosen[3],
                     params_price=chosen[4])
    counts, ratios, reached = chosen[:3]
    found.update(macs_reduction=reached, ratios=ratios,
                 predicted_loss_increase=sum(_loss_at(table, n, r) for n, r in ratios.items()))
    if abs(reached - target) > tolerance:
        found["note"] = (f"the allocation came within {100 * abs(reached - target):.2f} pp of the target, "
                         f"not {100 * tolerance:.1f}; a finer prune.sensitivity_grid gets closer")
    return counts, found


def _reach_macs(ctx: PlanContext, table: Mapping[str, Any], names: list[str], tolerance: float,
                params_weight: float) -> tuple[Counts, dict[str, float], float]:
    """The allocation whose real MACs reduction comes closest to the target: (counts, ratios, reduction)."""
    target = ctx.spec.target_macs_reduction
    aim, tried = target, []
    for _ in range(8):
        ratios = allocate(table, names, min(max(aim, 1e-3), 0.999), params_weight=params_weight)
        if ratios is None:
            break
        counts = ctx.settled({s.name: removed_count(ratios[s.name], s.size) for s in ctx.sets})
        reached = ctx.meter().reduction(ctx.shapes(counts))
        tried.append((abs(reached - target) + (reached < target - tolerance), counts, ratios, reached))
        if abs(reached - target) <= tolerance:
            break
        aim += target - reached
    if not tried:
        raise ValueError(f"prune.target_macs_reduction={target} is beyond what prune.sensitivity_grid="
                         f"{list(table['grid'])} can remove; extend the grid")
    return min(tried, key=lambda t: t[0])[1:]


def _priced(ctx: PlanContext, table: Mapping[str, Any], names: list[str], tolerance: float, target: float
            ) -> tuple[Counts, dict[str, float], float, float, float]:
    """``_reach_macs`` with the smallest price on kept parameters (a Lagrange multiplier, searched by
    doubling then bisection) at which the parameters fall by ``target``: (counts, ratios, MACs reduction,
    parameters reduction, price)."""
    if any(table["layers"][n].get("params_saved") is None for n in names):
        raise ValueError("the sensitivity table has no params_saved rows (measured by an older version); measure "
                         "it again")
    base = count_params(ctx.needs_model()[0])

    def attempt(price: float) -> tuple:
        counts, ratios, reached = _reach_macs(ctx, table, names, tolerance, price)
        return counts, ratios, reached, 1.0 - count_params(ctx.shapes(counts)) / base, price

    low, high = 0.0, attempt(0.0)
    price = 1e-3
    while high[3] < target:
        if price > 1e4:
            raise ValueError(f"prune.target_params_reduction={target} is beyond reach at prune.target_macs_reduction="
                             f"{ctx.spec.target_macs_reduction}: at most {100 * high[3]:.2f}% of the parameters; "
                             "raise the MACs target or extend prune.sensitivity_grid")
        low, high = high[4], attempt(price)
        price *= 4
    for _ in range(8 if high[4] > 0 else 0):
        middle = attempt((low + high[4]) / 2)
        if middle[3] >= target:
            high = middle
        else:
            low = middle[4]
    return high


def _check_table(table: Mapping[str, Any], sets: list[ChannelSet], spec: PlanSpec) -> None:
    missing = sorted({s.name for s in sets} - set(table["layers"]))
    if missing:
        raise ValueError(f"the sensitivity table has no row for {', '.join(missing)}; measure it again")
    measured = {key: table.get(key) for key in ("min_channels", "round_to")}
    wanted = {"min_channels": spec.min_channels, "round_to": spec.round_to}
    if measured != wanted:
        raise ValueError(f"the sensitivity table was measured with {measured}, this plan has {wanted}; measure "
                         "it again")


def _loss_at(table: Mapping[str, Any], name: str, ratio: float) -> float:
    if ratio == 0.0:
        return 0.0
    return table["layers"][name]["loss_increase"][table["grid"].index(ratio)]
