"""The ``target_speedup`` protocol: prune until the network is predicted to run ``x`` times faster on the
user's runtime, then measure that it does.

Before any statistics, ``prepare`` builds (or reads from the cache) the latency table of the architecture
on ``latency_runtime`` at ``latency_batch`` and ``latency_threads`` (``qsfm_cli.latency_table``) and refuses
a target above the largest speed-up the table predicts. ``allocation`` spreads the pruning:

- ``uniform``: the smallest uniform ratio whose predicted speed-up reaches the target;
- ``sensitivity``: per-set kept widths of least summed loss increase (the sensitivity table, interpolated
  between its ratios) whose predicted speed-up reaches the target: a knapsack over the milliseconds each
  set's width saves, so the cost is loss per millisecond rather than per MAC. The widths it chooses from
  are the table's grid (multiples of 4 and more, so the 8- and 16-channel multiples CPU kernels run
  fastest) and the widest pruning the sensitivity grid measured; a ragged width is chosen only where its
  loss per millisecond is better.

Each set's layers and blocks are timed alone, so the table can miss what widths do together in the whole
network. With ``latency_replans`` (default 2) the planned network (shapes only: weights do not change its
speed) is timed beside the unpruned one before any recovery; where the table's prediction missed, the plan
is made again for the target scaled by the miss, and of the plans measured the least pruned one that
reaches the target (plus half the tolerance, so that the check after pruning still finds it) is kept, else
the fastest. An untrusted measurement (a busy machine) ends the loop.

``verify`` times the unpruned and the pruned network together (``latency.measure_pair``) on the same
runtime, batch and threads; a trusted speed-up below ``(1 - speedup_tolerance) * target`` is reported as
falling short, in the record and the log.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from .. import latency_table as lt
from ..cache import fingerprint
from ..latency import PairLatency, measure_pair
from ..pruning import architecture
from ..types import ChannelSet
from .base import Counts, PlanContext, Strategy, register_protocol, removed_count, settle, smallest_kept
from .ratio import ratio_counts
from .sensitivity import _check_table, least_cost, measure_sensitivity

if TYPE_CHECKING:
    from .spec import PlanSpec

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "sensitivity")
_BINS = 2000               # the knapsack's resolution: the milliseconds to save, in this many steps
_AIMS = 12                 # knapsacks solved per plan, each aiming at more summed savings
# A measured speed-up is a ratio of two medians; on a shared 2-core machine ten timings left it 5-8% apart
# between two measurements of one architecture, so whole-network pairs take at least this many.
PAIR_REPEATS = 30


@register_protocol
class Speed(Strategy):
    name = "target_speedup"

    def check(self, spec: PlanSpec) -> None:
        if spec.target_speedup is not None and not (math.isfinite(spec.target_speedup) and spec.target_speedup > 1):
            raise ValueError(f"prune.target_speedup={spec.target_speedup}; accepted: a number > 1")
        lt.check_settings(spec.latency_runtime, spec.latency_batch, spec.latency_threads, spec.latency_repeats,
                          prefix="prune.latency_")
        if not 0 <= spec.speedup_tolerance < 1:
            raise ValueError(f"prune.speedup_tolerance={spec.speedup_tolerance}; accepted: a number in [0, 1)")
        if spec.target_speedup is not None and spec.allocation not in ALLOCATIONS:
            raise ValueError(f"prune.allocation={spec.allocation} with prune.target_speedup; accepted: "
                             f"{', '.join(ALLOCATIONS)}")

    def needs_sensitivity(self, spec: PlanSpec) -> bool:
        return spec.allocation == "sensitivity"

    def prepare(self, spec: PlanSpec, model: nn.Module, example: torch.Tensor, sets: list[ChannelSet],
                cached: Callable[[str, str, Callable[[], Any]], Any], *, device: str | torch.device = "cpu",
                progress: bool = False) -> dict[str, Any]:
        settings = dict(runtime=spec.latency_runtime, batch=spec.latency_batch, threads=spec.latency_threads,
                        device=device, repeats=spec.latency_repeats)
        key = fingerprint("latency_table", lt.conditions(model, example, sets, **settings))
        table = cached("latency_table", key, lambda: lt.build_table(model, example, sets, progress=progress,
                                                                    **settings))
        log.info("latency table: %s", lt.describe(table))
        # the sensitivity allocation goes no further than the largest ratio its table measured
        grid_ratio = max(spec.sensitivity_grid) if spec.allocation == "sensitivity" else None
        best = lt.predicted_speedup(table, {s.name: _options(s, spec, grid_ratio)[0] for s in sets})
        if spec.target_speedup > best:
            fewest = "every set at its fewest channels" if grid_ratio is None else (
                f"every set pruned at prune.sensitivity_grid's largest ratio {grid_ratio:g}")
            raise ValueError(f"prune.target_speedup={spec.target_speedup:g} cannot be reached: the largest "
                             f"predicted speed-up is {best:.2f}x ({_conditions(spec)}, {fewest}); accepted: up "
                             f"to {math.floor(best * 100) / 100:.2f}")
        return table

    def counts(self, ctx: PlanContext) -> tuple[Counts, dict[str, Any]]:
        spec, sets, table = ctx.spec, ctx.sets, ctx.prepared
        if table is None:
            raise ValueError("prune.target_speedup needs the latency table (Strategy.prepare)")
        counts, found = _allocate(ctx, table, spec.target_speedup)
        if spec.latency_replans and ctx.model is not None and ctx.example_input is not None:
            counts, found = _replan(ctx, table, counts, found)
        kept = {s.name: s.size - counts[s.name] for s in sets}
        predicted = lt.predicted_speedup(table, kept)
        found.update(target_speedup=spec.target_speedup, predicted_speedup=predicted,
                     predicted_ms=lt.predict_ms(table, kept), latency_table=_summary(table))
        if ctx.model is not None and ctx.example_input is not None:
            found["macs_reduction"] = ctx.meter().reduction(ctx.pruned(counts))
        measured = next((r for r in found.get("replans", []) if r.get("chosen") and r["trusted"]), None)
        if predicted < spec.target_speedup and not (measured and measured["measured_speedup"] >= spec.target_speedup):
            found["note"] = f"the plan is predicted at {predicted:.2f}x, below the target {spec.target_speedup:g}x"
        return counts, found

    def verify(self, spec: PlanSpec, base: nn.Module, pruned: nn.Module, info: dict[str, Any], *,
               device: str | torch.device = "cpu") -> dict[str, Any]:
        example = info["latency_table"]["input_shape"]
        pair = _time_pair(spec, base, pruned, device, tuple(example[1:]))
        target = spec.target_speedup
        met = pair.speedup >= (1 - spec.speedup_tolerance) * target
        result = {"target_speedup": target, "predicted_speedup": info["predicted_speedup"],
                  "measured_speedup": pair.speedup, "trusted": pair.trusted, "met": met if pair.trusted else None,
                  "tolerance": spec.speedup_tolerance, "runtime": spec.latency_runtime, "batch": spec.latency_batch,
                  "threads": spec.latency_threads, "base_ms": pair.base_ms, "pruned_ms": pair.pruned_ms,
                  "predicted_ms": info["predicted_ms"], "base_spread": pair.base_spread,
                  "pruned_spread": pair.pruned_spread}
        said = (f"speed-up target {target:g}x ({_conditions(spec)}): predicted {info['predicted_speedup']:.2f}x, "
                f"measured {pair.speedup_text()}")
        if not pair.trusted:
            result["note"] = (f"the measured speed-up is untrusted (spread above {pair.max_spread:g}): whether the "
                              "target is met is unknown; measure again on a quieter machine")
            log.warning("%s; %s", said, result["note"])
        elif not met:
            result["note"] = (f"the measured speed-up {pair.speedup:.2f}x falls short of the target {target:g}x by "
                              f"more than {100 * spec.speedup_tolerance:g}%")
            log.warning("%s; %s", said, result["note"])
        else:
            log.info("%s: target met", said)
        return result


def _conditions(spec: PlanSpec) -> str:
    return (f"{spec.latency_runtime}, batch {spec.latency_batch}, {spec.latency_threads} "
            f"thread{'s' if spec.latency_threads > 1 else ''}")


def _summary(table: dict[str, Any]) -> dict[str, Any]:
    """The table's conditions and cost, for the plan record (the timings themselves stay in the cache)."""
    keys = ("runtime", "device", "batch", "threads", "input_shape", "base_ms", "base_spread", "timed_shapes",
            "build_s")
    return {k: table[k] for k in keys}


def _options(s: ChannelSet, spec: PlanSpec, grid_ratio: float | None = None) -> list[int]:
    """Kept widths a set may take, fewest first: the table's grid widths the plan's ``min_channels`` and
    ``round_to`` allow, and the fewest channels these allow (with ``grid_ratio``: the fewest the largest
    ratio of the sensitivity grid leaves)."""
    fewest = smallest_kept(s.size, spec.min_channels, spec.round_to)
    if grid_ratio is not None:
        fewest = s.size - settle(removed_count(grid_ratio, s.size), s.size, spec.min_channels, spec.round_to)
    allowed = {w for w in lt.grid_widths(s.size)
               if w >= fewest and settle(s.size - w, s.size, spec.min_channels, spec.round_to) == s.size - w}
    return sorted(allowed | {fewest})


def _allocate(ctx: PlanContext, table: dict[str, Any], aim: float) -> tuple[Counts, dict[str, Any]]:
    if ctx.spec.allocation == "sensitivity":
        return _by_sensitivity(ctx, table, aim)
    return _by_ratio(ctx, table, aim)


def _replan(ctx: PlanContext, table: dict[str, Any], counts: Counts, found: dict[str, Any]
            ) -> tuple[Counts, dict[str, Any]]:
    """The planned network timed beside the unpruned one; planned again for the target scaled by the
    prediction's miss, up to ``latency_replans`` times (module docstring)."""
    spec, target = ctx.spec, ctx.spec.target_speedup
    # aimed half the tolerance above the target, so that the check after pruning, a new measurement, still
    # finds the target met
    goal = target * (1 + spec.speedup_tolerance / 2)
    device = next(ctx.model.parameters()).device
    aim, tried = target, []
    for attempt in range(spec.latency_replans + 1):
        if attempt:
            try:
                counts, found = _allocate(ctx, table, aim)
            except ValueError:           # the scaled aim is beyond what the table or the grid can reach
                break
            if any(t[1] == counts for t in tried):
                break
        pair = _measured(ctx, counts, device)
        kept = {s.name: s.size - counts[s.name] for s in ctx.sets}
        tried.append((pair, counts, found, {"aim": aim, "predicted_speedup": lt.predicted_speedup(table, kept),
                                            "measured_speedup": pair.speedup, "trusted": pair.trusted}))
        log.info("speed-up target %g: plan %d aimed at %.2fx is predicted %.2fx, measured %s", target, attempt + 1,
                 aim, tried[-1][3]["predicted_speedup"], pair.speedup_text())
        if not pair.trusted or goal <= pair.speedup <= goal * (1 + spec.speedup_tolerance):
            break
        aim = goal * tried[-1][3]["predicted_speedup"] / pair.speedup    # the prediction's miss, corrected
    reached = [t for t in tried if t[0].trusted and t[0].speedup >= goal]
    trusted = [t for t in tried if t[0].trusted] or tried[:1]
    chosen = min(reached, key=lambda t: t[0].speedup) if reached else max(trusted, key=lambda t: t[0].speedup)
    chosen[3]["chosen"] = True
    return chosen[1], {**chosen[2], "replans": [t[3] for t in tried]}


def _time_pair(spec: PlanSpec, base: nn.Module, pruned: nn.Module, device: str | torch.device,
               input_hw: tuple[int, ...]) -> PairLatency:
    """``base`` and ``pruned`` timed in alternation on the plan's runtime, batch and threads."""
    [pair] = measure_pair(base, pruned, [spec.latency_batch], runtime=spec.latency_runtime, device=device,
                          input_hw=input_hw, repeats=max(spec.latency_repeats, PAIR_REPEATS),
                          threads=spec.latency_threads)
    return pair


def _measured(ctx: PlanContext, counts: Counts, device: torch.device) -> PairLatency:
    """The planned network (its shapes) timed beside the unpruned one; kept in ``ctx.cached`` under the
    table's conditions and the pruned architecture, so that the same plan is made again from it."""
    spec, pruned = ctx.spec, ctx.shapes(counts)

    def measure() -> dict[str, Any]:
        return _time_pair(spec, ctx.model, pruned, device, tuple(ctx.example_input.shape[2:])).to_dict()

    if ctx.cached is None:
        return PairLatency(**measure())
    conditions = lt.conditions(ctx.model, ctx.example_input, ctx.sets, runtime=spec.latency_runtime,
                               batch=spec.latency_batch, threads=spec.latency_threads, device=device,
                               repeats=max(spec.latency_repeats, PAIR_REPEATS))
    key = fingerprint("plan_latency", conditions, architecture(pruned))
    return PairLatency(**ctx.cached("plan_latency", key, measure))


def _by_ratio(ctx: PlanContext, table: dict[str, Any], aim: float) -> tuple[Counts, dict[str, Any]]:
    """The smallest uniform ratio whose predicted speed-up reaches ``aim`` (the largest one tried where
    none does)."""
    spec, sets = ctx.spec, ctx.sets
    steps = sorted({k / s.size for s in sets for k in range(1, s.size)})
    counts = ratio_counts(0.0, sets, spec.min_channels, spec.round_to)
    ratio = 0.0
    for ratio in steps:
        counts = ratio_counts(ratio, sets, spec.min_channels, spec.round_to)
        if lt.predicted_speedup(table, {s.name: s.size - counts[s.name] for s in sets}) >= aim:
            break
    return counts, {"ratio": ratio}


def _loss_at(row: dict[str, Any], grid: list[float], removed: float) -> float:
    """Loss increase at a removed fraction, linear between the measured ratios (0 at ratio 0)."""
    points = [(0.0, 0.0)] + [(r, c) for r, c in zip(grid, row["loss_increase"]) if c is not None]
    xs, ys = zip(*points)
    return float(np.interp(removed, xs, ys))


def _by_sensitivity(ctx: PlanContext, table: dict[str, Any], target: float) -> tuple[Counts, dict[str, Any]]:
    """Per-set widths of least summed (interpolated) loss increase whose predicted speed-up reaches
    ``target``. Savings of single sets are what the knapsack adds up; the product predictor does not add
    them exactly, so the amount aimed at is corrected until the prediction reaches the target."""
    spec, sets = ctx.spec, ctx.sets
    if ctx.sensitivity is None:
        if ctx.loss_of is None:
            raise ValueError("prune.allocation=sensitivity needs loss_of, the held-out loss of a model "
                             "(qsfm_cli.evaluate.heldout_loss)")
        ctx.sensitivity = measure_sensitivity(sets, ctx.orders, spec.sensitivity_grid, ctx.pruner(), ctx.loss_of,
                                              ctx.meter(), spec.min_channels, round_to=spec.round_to,
                                              progress=ctx.progress)
    sens = ctx.sensitivity
    _check_table(sens, sets, spec)
    base_ms = table["base_ms"]
    need = base_ms - base_ms / target
    options = {}
    for s in sets:
        row = sens["layers"][s.name]
        widths = _options(s, spec, max(sens["grid"]))
        options[s.name] = [(w, base_ms - lt.predict_ms(table, {s.name: w}),
                            _loss_at(row, sens["grid"], (s.size - w) / s.size)) for w in reversed(widths)]
    # Sets that share layers (a residual stream and the blocks along it) save less together than apart:
    # the summed savings aimed at are scaled by what the prediction found, until it reaches the target.
    most = sum(max(gain for _, gain, _ in choices) for choices in options.values())
    aim, tried = need, []
    for _ in range(_AIMS):
        widths = least_cost(options, aim, need / _BINS)
        if widths is None:
            break
        predicted = lt.predicted_speedup(table, widths)
        loss = sum(next(c for w, _, c in options[n] if w == k) for n, k in widths.items())
        tried.append((predicted < target, loss, widths, predicted))
        if predicted >= target or aim >= most:
            break
        aim = min(most, aim * need / max(base_ms - lt.predict_ms(table, widths), need / _BINS))
    if not tried:
        raise ValueError(f"prune.target_speedup={target:g} is beyond what prune.sensitivity_grid="
                         f"{list(sens['grid'])} can remove; extend the grid")
    short, loss, widths, _ = min(tried, key=lambda t: (t[0], t[1] if not t[0] else -t[3]))
    counts = {s.name: s.size - widths[s.name] for s in sets}
    return counts, {"sensitivity": sens, "kept_widths": widths, "predicted_loss_increase": loss}
