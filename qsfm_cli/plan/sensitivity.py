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

from ..counting import MacsMeter
from ..types import ChannelSet, Keep, Orders
from .base import Counts, PlanContext, keep_from_counts, removed_count, settle

if TYPE_CHECKING:
    from .spec import PlanSpec


def measure_sensitivity(sets: list[ChannelSet], orders: Orders, grid: Sequence[float],
                        prune_fn: Callable[[Keep], nn.Module], loss_of: Callable[[nn.Module], float],
                        meter: MacsMeter, min_channels: int = 1, *, round_to: int = 1,
                        progress: bool = False) -> dict[str, Any]:
    """Per set, the loss increase and the fraction of MACs saved when only that set is pruned at each
    ratio of ``grid``, its count settled by ``min_channels`` and ``round_to`` as the plan settles it.
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
        base_loss = loss_of(prune_fn({}))
        bar.update()
        for s in sets:
            loss_increase, macs_saved = [], []
            for n in removed[s.name]:
                if n is None:
                    loss_increase.append(None)
                    macs_saved.append(None)
                    continue
                pruned = prune_fn(keep_from_counts(orders, [s], {s.name: n}))
                loss_increase.append(loss_of(pruned) - base_loss)
                macs_saved.append(meter.reduction(pruned))
                bar.update()
            layers[s.name] = {"removed": removed[s.name], "loss_increase": loss_increase,
                              "macs_saved": macs_saved}
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


def allocate(table: Mapping[str, Any], names: list[str], target: float, resolution: float = 5e-4
             ) -> dict[str, float] | None:
    """Per-set ratios of least summed loss increase whose summed MACs savings reach ``target`` (a
    knapsack over the savings, discretized to ``resolution``); None when the grid cannot reach it."""
    bins = max(1, math.ceil(target / resolution))
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    trace = []
    for name in names:
        row = table["layers"][name]
        options = [(0.0, 0, 0.0)] + [(r, max(0, round(s / resolution)), c) for r, s, c in
                                     zip(table["grid"], row["macs_saved"], row["loss_increase"]) if c is not None]
        new = np.full(bins + 1, np.inf)
        pick = np.zeros(bins + 1, dtype=np.int64)
        prev = np.zeros(bins + 1, dtype=np.int64)
        for b in np.flatnonzero(np.isfinite(best)):
            for k, (_, saved, cost) in enumerate(options):
                to = min(bins, b + saved)
                if best[b] + cost < new[to]:
                    new[to], pick[to], prev[to] = best[b] + cost, k, b
        trace.append((options, pick, prev))
        best = new
    if not np.isfinite(best[bins]):
        return None
    ratios, b = {}, bins
    for name, (options, pick, prev) in zip(reversed(names), reversed(trace)):
        ratios[name] = options[pick[b]][0]
        b = prev[b]
    return ratios


def sensitivity_counts(ctx: PlanContext, tolerance: float) -> tuple[Counts, dict[str, Any]]:
    """Allocate by the table (measured here unless ``ctx.sensitivity`` holds one), then correct the target
    the allocation aims at until the real MACs reduction (savings of several pruned sets do not simply
    add up) is within ``tolerance``."""
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
    aim, tried = target, []
    for _ in range(8):
        ratios = allocate(table, names, min(aim, 0.999))
        if ratios is None:
            break
        counts = ctx.settled({s.name: removed_count(ratios[s.name], s.size) for s in sets})
        reached = ctx.meter().reduction(ctx.pruned(counts))
        tried.append((abs(reached - target) + (reached < target - tolerance), counts, ratios, reached))
        if abs(reached - target) <= tolerance:
            break
        aim += target - reached
    if not tried:
        raise ValueError(f"prune.target_macs_reduction={target} is beyond what prune.sensitivity_grid="
                         f"{list(table['grid'])} can remove; extend the grid")
    _, counts, ratios, reached = min(tried, key=lambda t: t[0])
    found = {"sensitivity": table, "target_macs_reduction": target, "macs_reduction": reached, "ratios": ratios,
             "predicted_loss_increase": sum(_loss_at(table, n, r) for n, r in ratios.items())}
    if abs(reached - target) > tolerance:
        found["note"] = (f"the allocation came within {100 * abs(reached - target):.2f} pp of the target, "
                         f"not {100 * tolerance:.1f}; a finer prune.sensitivity_grid gets closer")
    return counts, found


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
