"""Plan stage: from the scorers' removal orders and a pruning protocol to the channels each set keeps.

Protocols (config group ``prune/``; at most one of ``rates``, ``threshold``, ``target_macs_reduction``
is set, else ``ratio`` applies):

- ``ratio=r``: every set of the scope loses floor(r * C) of its C channels.
- ``rates="[0.]+[0.15]*2+[0.4]*27"``: the per-layer rate lists of HRank/CHIP, parsed by a small grammar
  (lists, ``+``, ``*``), mapped by a layout (``pruning.rate_layouts``, or one entry per set) chosen by the
  list's length, or by ``rate_layout`` where several layouts have that length; a set keeps
  int(C * (1 - rate)) channels, as the papers' code builds its pruned networks.
- ``threshold=tau``: each set removes its leading channels whose ``Order.values`` are >= tau.
- ``target_macs_reduction=f``: search the uniform ratio (``allocation=uniform``) or the global threshold
  (``allocation=threshold``) that removes the fraction f of the MACs, or (``allocation=sensitivity``)
  measure every set's loss increase on held-out training images at a grid of ratios and choose per-set
  ratios reaching f with the least summed increase.

The planner never edits weights; it builds pruned copies only to count their MACs and, for the
sensitivity table, to measure their loss.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .loaders import DeviceLoader
from .pruning import SCOPES, RateLayout, apply_keep, rate_layouts
from .scoring import Scorer, threshold_scorers
from .types import ChannelSet, Keep, Orders

ALLOCATIONS = ("uniform", "threshold", "sensitivity")
DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TOLERANCE = 0.005          # how close a searched MACs reduction must come to its target (0.5 pp)
_EPS = 1e-9                # floor(r * C) is taken on r * C + _EPS so that 0.57 * 100 removes 57, not 56


def removed_count(ratio: float, size: int) -> int:
    """Channels a ratio removes from a set of ``size``: floor(ratio * size), robust to 0.57 * 100 = 56.99..."""
    return math.floor(ratio * size + _EPS)


# ------------------------------------------------------------------------------------------ rate strings
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(?P<op>[\[\],+*]))")


def parse_rates(text: str | Sequence[float]) -> list[float]:
    """Expand a rate string: ``expr := term ('+' term)*``, ``term := atom ('*' INT)?``,
    ``atom := NUMBER | '[' NUMBER (',' NUMBER)* ']'``. A list of numbers is taken as it is."""
    if not isinstance(text, str):
        return [float(r) for r in text]
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"prune.rates: cannot read {text[pos:]!r} in {text!r}; expected numbers, "
                             "[...] lists, '+' and '*', e.g. \"[0.]+[0.4]*2+[0.5]*9\"")
        tokens.append((m.group("num") or m.group("op"), m.start(m.lastindex)))
        pos = m.end()
    return _RateParser(text, tokens).parse()


class _RateParser:
    def __init__(self, text: str, tokens: list[tuple[str, int]]):
        self.text, self.tokens, self.i = text, tokens, 0

    def fail(self, expected: str):
        at = f"at {self.tokens[self.i][0]!r} (position {self.tokens[self.i][1]})" if self.i < len(self.tokens) \
            else "at the end"
        raise ValueError(f"prune.rates: expected {expected} {at} in {self.text!r}")

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        self.i += 1
        return tok

    def number(self) -> float:
        tok = self.peek()
        if tok is None or tok in "[],+*":
            self.fail("a number")
        return float(self.take())

    def atom(self) -> list[float]:
        if self.peek() != "[":
            return [self.number()]
        self.take()
        values = [self.number()]
        while self.peek() == ",":
            self.take()
            values.append(self.number())
        if self.peek() != "]":
            self.fail("',' or ']'")
        self.take()
        return values

    def term(self) -> list[float]:
        values = self.atom()
        if self.peek() == "*":
            self.take()
            tok = self.peek()
            if tok is None or not tok.isdigit():
                self.fail("a whole repeat count after '*'")
            values = values * int(self.take())
        return values

    def parse(self) -> list[float]:
        values = self.term()
        while self.peek() == "+":
            self.take()
            values += self.term()
        if self.peek() is not None:
            self.fail("'+' or the end")
        return values


# ----------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class PlanSpec:
    """The ``prune/`` config group as plain values (see the module docstring)."""

    ratio: float = 0.5
    rates: str | tuple[float, ...] | None = None
    rate_layout: str | None = None
    threshold: float | None = None
    target_macs_reduction: float | None = None
    allocation: str = "uniform"
    sensitivity_grid: tuple[float, ...] = DEFAULT_GRID
    sensitivity_images: int = 256
    scope: str = "default"
    min_channels: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"prune.ratio must be in [0, 1), got {self.ratio}")
        chosen = [k for k in ("rates", "threshold", "target_macs_reduction") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"prune.{chosen[0]} and prune.{chosen[1]} are both set; set at most one of "
                             "prune.rates, prune.threshold, prune.target_macs_reduction")
        if self.rates is not None:  # parsed here; the range is checked with the layout (``_rate_counts``)
            rates = parse_rates(self.rates)
            object.__setattr__(self, "rates", self.rates if isinstance(self.rates, str) else tuple(rates))
        if self.rate_layout is not None and self.rates is None:
            raise ValueError(f"prune.rate_layout={self.rate_layout} needs prune.rates")
        if self.target_macs_reduction is not None and not 0 < self.target_macs_reduction < 1:
            raise ValueError(f"prune.target_macs_reduction must be in (0, 1), got {self.target_macs_reduction}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown prune.allocation {self.allocation!r}; accepted: {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.target_macs_reduction is None:
            raise ValueError(f"prune.allocation={self.allocation} needs prune.target_macs_reduction")
        grid = tuple(float(r) for r in self.sensitivity_grid)
        if not grid or any(not 0 < r < 1 for r in grid):
            raise ValueError(f"prune.sensitivity_grid must hold ratios in (0, 1), got {list(grid)}")
        object.__setattr__(self, "sensitivity_grid", tuple(sorted(set(grid))))
        if self.scope not in SCOPES:
            raise ValueError(f"unknown prune.scope {self.scope!r}; accepted: {', '.join(SCOPES)}")
        if self.min_channels < 1:
            raise ValueError(f"prune.min_channels must be >= 1, got {self.min_channels}")
        if self.sensitivity_images < 1:
            raise ValueError(f"prune.sensitivity_images must be >= 1, got {self.sensitivity_images}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "PlanSpec":
        """From the ``prune`` config mapping."""
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown key prune.{unknown[0]}; accepted: {', '.join(sorted(names))}")
        values = dict(cfg)
        if "sensitivity_grid" in values:
            values["sensitivity_grid"] = tuple(values["sensitivity_grid"])
        return cls(**values)

    @property
    def protocol(self) -> str:
        for key in ("rates", "threshold", "target_macs_reduction"):
            if getattr(self, key) is not None:
                return key
        return "ratio"

    @property
    def uses_threshold(self) -> bool:
        """Whether the plan compares the scorer's ``Order.values`` with a threshold."""
        return self.protocol == "threshold" or self.allocation == "threshold"

    def describe(self) -> dict[str, Any]:
        """The fields a results row shows (scalars and strings only, so that reports can group on them)."""
        rates = self.rates if isinstance(self.rates, (str, type(None))) else str(list(self.rates))
        return {"protocol": self.protocol, "ratio": self.ratio if self.protocol == "ratio" else None,
                "rates": rates, "rate_layout": self.rate_layout,
                "threshold": self.threshold, "target_macs_reduction": self.target_macs_reduction,
                "allocation": self.allocation, "scope": self.scope, "min_channels": self.min_channels}

    def validate(self, sets: list[ChannelSet], model: nn.Module | None = None,
                 scorer: Scorer | None = None) -> None:
        """Checks that need the channel sets or the scorer, done before any statistics are collected.
        The rate list (layout, range) is checked only with ``model``, which the papers' layouts depend on
        (``make_keep``, which gets the model, checks it in any case)."""
        if not sets:
            raise ValueError(f"prune.scope={self.scope} has no prunable channel set in this model")
        if self.uses_threshold and scorer is not None and not getattr(scorer, "threshold_rule", False):
            setting = "prune.threshold" if self.protocol == "threshold" else "prune.allocation=threshold"
            raise ValueError(f"{setting} needs a scorer with a threshold rule; scorer {scorer.name!r} has none; "
                             f"scorers with one: {', '.join(threshold_scorers())}")
        if self.rates is not None and model is not None:
            _rate_counts(parse_rates(self.rates), sets, _layouts(sets, model), self)


# ----------------------------------------------------------------------------------------------- plan
def make_keep(orders: Orders, sets: list[ChannelSet], plan: PlanSpec, *, model: nn.Module | None = None,
              example_input: torch.Tensor | None = None,
              loss_of: Callable[[nn.Module], float] | None = None,
              prune_fn: Callable[[Keep], nn.Module] | None = None,
              sensitivity: dict | None = None) -> tuple[Keep, dict[str, Any]]:
    """Kept channel indices of every set in ``sets``, and a JSON-able record of the plan.

    ``model``/``example_input`` are needed by the MACs target (and give the paper rate layouts);
    ``loss_of`` (see ``heldout_loss``) by ``allocation=sensitivity``, which prunes through ``prune_fn``
    (default: ``apply_keep`` without compensation) and reuses a ``sensitivity`` table when given.
    The record holds the removal counts, what a search reached, notes, and the sensitivity table.
    """
    missing = [s.name for s in sets if s.name not in orders]
    if missing:
        raise ValueError(f"no removal order for channel set(s) {', '.join(missing)}")
    info: dict[str, Any] = {"protocol": plan.protocol, "notes": []}
    if plan.protocol == "ratio":
        counts = _ratio_counts(plan.ratio, sets, plan.min_channels)
    elif plan.protocol == "rates":
        counts, layout, notes = _rate_counts(parse_rates(plan.rates), sets, _layouts(sets, model), plan)
        info.update(layout=layout, notes=notes)
    elif plan.protocol == "threshold":
        counts = _threshold_counts(plan.threshold, orders, sets, plan.min_channels)
    else:
        if model is None or example_input is None:
            raise ValueError("prune.target_macs_reduction needs the model and an example input to count MACs")
        prune_fn = prune_fn or (lambda keep: apply_keep(model, keep, example_input))
        meter = MacsMeter(model, example_input)
        if plan.allocation == "sensitivity":
            if loss_of is None:
                raise ValueError("prune.allocation=sensitivity needs loss_of, the held-out loss of a model "
                                 "(qsfm_cli.plan.heldout_loss)")
            if sensitivity is None:
                sensitivity = measure_sensitivity(sets, orders, plan.sensitivity_grid, prune_fn, loss_of,
                                                  meter, plan.min_channels)
            info["sensitivity"] = sensitivity
            counts, found = _sensitivity_counts(sensitivity, sets, orders, plan, prune_fn, meter)
        else:
            counts, found = _search_counts(plan, sets, orders, prune_fn, meter)
        info.update(found)
    info["removed"] = counts
    return keep_from_counts(orders, sets, counts), info


def keep_from_counts(orders: Orders, sets: list[ChannelSet], counts: dict[str, int]) -> Keep:
    """Per set, the sorted channels left when the first ``counts[name]`` of its removal order are removed."""
    keep = {}
    for s in sets:
        removed = set(orders[s.name].removal[:counts[s.name]])
        keep[s.name] = [c for c in range(s.size) if c not in removed]
    return keep


def _clamp(count: int, size: int, min_channels: int) -> int:
    return max(0, min(count, size - min_channels))


def _ratio_counts(ratio: float, sets: list[ChannelSet], min_channels: int) -> dict[str, int]:
    return {s.name: _clamp(removed_count(ratio, s.size), s.size, min_channels) for s in sets}


def _threshold_counts(tau: float, orders: Orders, sets: list[ChannelSet], min_channels: int) -> dict[str, int]:
    counts = {}
    for s in sets:
        values = orders[s.name].values
        if values is None:
            raise ValueError(f"prune.threshold needs a scorer with a threshold rule, and the orders of "
                             f"{s.name!r} carry no threshold values; scorers with one: "
                             f"{', '.join(threshold_scorers())}")
        n = next((k for k, v in enumerate(values) if not v >= tau), len(values))
        counts[s.name] = _clamp(n, s.size, min_channels)
    return counts


# ------------------------------------------------------------------------------------------ rate layouts
def _layouts(sets: list[ChannelSet], model: nn.Module | None) -> list[RateLayout]:
    per_set = RateLayout("per-set", f"one entry per channel set of the scope, in forward order "
                         f"({', '.join(s.name for s in sets[:3])}{', ...' if len(sets) > 3 else ''})",
                         tuple(s.name for s in sets))
    paper = rate_layouts(model) if model is not None else []
    return paper + [per_set]


def _choose_layout(rates: list[float], layouts: list[RateLayout], chosen: str | None) -> RateLayout:
    """The layout named by ``prune.rate_layout``, else the only one with the list's length."""
    if chosen is not None:
        layout = next((lay for lay in layouts if lay.name == chosen), None)
        if layout is None:
            raise ValueError(f"unknown prune.rate_layout {chosen!r}; accepted for this model: "
                             f"{', '.join(lay.name for lay in layouts)}")
        if len(layout.targets) != len(rates):
            raise ValueError(f"prune.rates has {len(rates)} entries; prune.rate_layout={chosen} takes "
                             f"{len(layout.targets)} ({layout.description})")
        return layout
    matching = [lay for lay in layouts if len(lay.targets) == len(rates)]
    if not matching:
        accepted = "; ".join(f"{len(lay.targets)} ({lay.description})" for lay in layouts)
        raise ValueError(f"prune.rates has {len(rates)} entries; this model accepts {accepted}")
    if len(matching) > 1:
        names = ", ".join(lay.name for lay in matching)
        described = "; ".join(f"{lay.name} ({lay.description})" for lay in matching)
        raise ValueError(f"prune.rates has {len(rates)} entries, which fits several layouts of this model: "
                         f"{described}; choose one with prune.rate_layout=<{names.replace(', ', '|')}>")
    return matching[0]


def _rate_counts(rates: list[float], sets: list[ChannelSet], layouts: list[RateLayout], plan: PlanSpec
                 ) -> tuple[dict[str, int], str, list[str]]:
    layout = _choose_layout(rates, layouts, plan.rate_layout)
    for k, (target, rate) in enumerate(zip(layout.targets, rates)):
        if not 0 <= rate < 1:
            where = target if target is not None else "an entry its paper's code ignores"
            raise ValueError(f"prune.rates entry {k} ({layout.name} layout: {where}) is {rate}; every rate "
                             "must be in [0, 1)")
    scope, min_channels = plan.scope, plan.min_channels
    sizes = {s.name: s.size for s in sets}
    counts = {s.name: 0 for s in sets}
    ignored = []
    for k, (target, rate) in enumerate(zip(layout.targets, rates)):
        if target is None:
            if rate:
                ignored.append(k)
            continue
        if target not in sizes:
            raise ValueError(f"prune.rates ({layout.name} layout) entry {k} prunes {target!r}, which is not in "
                             f"prune.scope={scope}; use prune.scope=stage")
        kept = int(sizes[target] * (1 - rate))  # the papers' own rounding
        counts[target] = _clamp(sizes[target] - kept, sizes[target], min_channels)
    notes = [f"{layout.name} layout: {len(ignored)} nonzero entries (from entry {ignored[0]} on) are ignored, "
             "as in the paper's pruned-model code"] if ignored else []
    return counts, layout.name, notes


# ------------------------------------------------------------------------------------------------ MACs
class MacsMeter:
    """MACs of pruned copies of one model, counted from their layer shapes.

    Channel pruning leaves every layer's output resolution unchanged, so a conv/linear layer costs
    (its weight's element count) x (its output positions per image), the positions recorded once on the
    unpruned model. Checked against ``evaluate.count_macs`` on that model; where they differ (ops other
    than conv/linear), every count falls back to ``count_macs``.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        from .evaluate import count_macs

        self.input_size = (1, *example_input.shape[1:])
        self.count_macs = count_macs
        self.positions: dict[str, int] = {}
        handles = [m.register_forward_hook(self._record(name)) for name, m in model.named_modules()
                   if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example_input[:1])
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        self.exact = self._from_shapes(model) == count_macs(model, self.input_size)
        self.base = self(model)

    def _record(self, name: str):
        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            channels = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            self.positions[name] = self.positions.get(name, 0) + output.numel() // channels
        return hook

    def _from_shapes(self, model: nn.Module) -> int:
        return sum(m.weight.numel() * self.positions.get(name, 0) for name, m in model.named_modules()
                   if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))

    def __call__(self, model: nn.Module) -> int:
        return self._from_shapes(model) if self.exact else self.count_macs(model, self.input_size)

    def reduction(self, model: nn.Module) -> float:
        return 1.0 - self(model) / self.base


# ------------------------------------------------------------------------------------ target searches
def _search_counts(plan: PlanSpec, sets: list[ChannelSet], orders: Orders, prune_fn, meter: MacsMeter
                   ) -> tuple[dict[str, int], dict[str, Any]]:
    """The uniform ratio (or global threshold) whose MACs reduction is closest to the target.

    Both are step functions: between two neighbouring steps several sets change at once (a uniform
    ratio moves every set of one width together), which can jump by several percentage points. The jump
    is then resolved set by set: the first sets, in forward order, take the next step's count, as many
    as bring the reduction closest to the target.
    """
    if plan.allocation == "uniform":
        steps = sorted({k / s.size for s in sets for k in range(s.size)})[1:] + [1.0 - _EPS]
        counts_at = lambda r: _ratio_counts(r, sets, plan.min_channels)  # noqa: E731
        start, key = counts_at(0.0), "ratio"
    else:
        start = _threshold_counts(math.inf, orders, sets, plan.min_channels)  # dead channels only
        steps = sorted({v for s in sets for v in orders[s.name].values if math.isfinite(v)}, reverse=True)
        counts_at = lambda t: _threshold_counts(t, orders, sets, plan.min_channels)  # noqa: E731
        key = "threshold"
    cache: dict[tuple, float] = {}

    def reduction(counts: dict[str, int]) -> float:
        k = tuple(counts.values())
        if k not in cache:
            cache[k] = meter.reduction(prune_fn(keep_from_counts(orders, sets, counts)))
        return cache[k]

    target = plan.target_macs_reduction
    top = counts_at(steps[-1])
    if reduction(top) < target - TOLERANCE:
        raise ValueError(f"prune.target_macs_reduction={target} cannot be reached: pruning with "
                         f"{key}={steps[-1]:.4g} (min_channels={plan.min_channels}) removes only "
                         f"{100 * reduction(top):.2f}% of the MACs")
    i = _first(len(steps), lambda i: reduction(counts_at(steps[i])) >= target)
    lower, upper = (counts_at(steps[i - 1]) if i > 0 else start), counts_at(steps[i])
    moving = [s.name for s in sets if upper[s.name] != lower[s.name]]
    between = lambda k: {**lower, **{n: upper[n] for n in moving[:k]}}  # noqa: E731
    k = _first(len(moving) + 1, lambda k: reduction(between(k)) >= target)
    if k > 0 and abs(reduction(between(k - 1)) - target) < abs(reduction(between(k)) - target):
        k -= 1
    counts = between(k)
    below = steps[i - 1] if i > 0 else (0.0 if key == "ratio" else None)  # None: above every value
    found = {key: steps[i] if k == len(moving) else below, "target_macs_reduction": target,
             "macs_reduction": reduction(counts), "evaluations": len(cache)}
    if 0 < k < len(moving):
        found.update(next_step=steps[i], next_step_sets=moving[:k])
    if abs(found["macs_reduction"] - target) > TOLERANCE:
        found["note"] = (f"no {key} comes within {100 * TOLERANCE:.1f} pp of the target; closest reached "
                         f"{100 * found['macs_reduction']:.2f}%")
    return counts, found


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


# ----------------------------------------------------------------------------------------- sensitivity
def heldout_loss(train_set: ImageSet, n: int, *, skip: int, seed: int, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> Callable[[nn.Module], float]:
    """Mean cross-entropy of a model on ``n`` training images that ``train_set.sample(skip, seed)`` (the
    images whose statistics were collected) does not hold: the same seeded permutation, next slice."""
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    index = perm[skip:skip + n] if skip < len(train_set) else perm[:0]
    if len(index) == 0:
        raise ValueError(f"no training images left for the sensitivity slice: {len(train_set)} images, "
                         f"{skip} used for statistics; lower collect.num_images")
    images = train_set.subset(index.sort().values)

    @torch.no_grad()
    def loss_of(model: nn.Module) -> float:
        model.eval()
        total = 0.0
        for x, y in DeviceLoader(images, batch_size, device=device):
            total += F.cross_entropy(model(x), y, reduction="sum").item()
        return total / len(images)

    return loss_of


def measure_sensitivity(sets: list[ChannelSet], orders: Orders, grid: Sequence[float],
                        prune_fn: Callable[[Keep], nn.Module], loss_of: Callable[[nn.Module], float],
                        meter: MacsMeter, min_channels: int = 1) -> dict[str, Any]:
    """Per set, the loss increase and the fraction of MACs saved when only that set is pruned at each
    ratio of ``grid`` (``None`` where the ratio would leave fewer than ``min_channels``)."""
    base_loss = loss_of(prune_fn({}))
    layers = {}
    for s in sets:
        loss_increase, macs_saved = [], []
        for ratio in grid:
            n = removed_count(ratio, s.size)
            if n == 0 or s.size - n < min_channels:
                loss_increase.append(None)
                macs_saved.append(None)
                continue
            pruned = prune_fn(keep_from_counts(orders, [s], {s.name: n}))
            loss_increase.append(loss_of(pruned) - base_loss)
            macs_saved.append(meter.reduction(pruned))
        layers[s.name] = {"loss_increase": loss_increase, "macs_saved": macs_saved}
    return {"grid": list(grid), "base_loss": base_loss, "layers": layers}


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


def _allocate(table: Mapping[str, Any], names: list[str], target: float, resolution: float = 5e-4
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


def _sensitivity_counts(table: Mapping[str, Any], sets: list[ChannelSet], orders: Orders, plan: PlanSpec,
                        prune_fn, meter: MacsMeter) -> tuple[dict[str, int], dict[str, Any]]:
    """Allocate by the table, then correct the target the allocation aims at until the real MACs
    reduction (savings of several pruned sets do not simply add up) is within the tolerance."""
    target = plan.target_macs_reduction
    names = [s.name for s in sets]
    missing = sorted(set(names) - set(table["layers"]))
    if missing:
        raise ValueError(f"the sensitivity table has no row for {', '.join(missing)}; measure it again")
    aim, tried = target, []
    for _ in range(8):
        ratios = _allocate(table, names, min(aim, 0.999))
        if ratios is None:
            break
        counts = {s.name: _clamp(removed_count(ratios[s.name], s.size), s.size, plan.min_channels)
                  for s in sets}
        reached = meter.reduction(prune_fn(keep_from_counts(orders, sets, counts)))
        tried.append((abs(reached - target) + (reached < target - TOLERANCE), counts, ratios, reached))
        if abs(reached - target) <= TOLERANCE:
            break
        aim += target - reached
    if not tried:
        raise ValueError(f"prune.target_macs_reduction={target} is beyond what prune.sensitivity_grid="
                         f"{list(table['grid'])} can remove; extend the grid")
    _, counts, ratios, reached = min(tried, key=lambda t: t[0])
    found = {"target_macs_reduction": target, "macs_reduction": reached, "ratios": ratios,
             "predicted_loss_increase": sum(_loss_at(table, n, r) for n, r in ratios.items())}
    if abs(reached - target) > TOLERANCE:
        found["note"] = (f"the allocation came within {100 * abs(reached - target):.2f} pp of the target, "
                         f"not {100 * TOLERANCE:.1f}; a finer prune.sensitivity_grid gets closer")
    return counts, found


def _loss_at(table: Mapping[str, Any], name: str, ratio: float) -> float:
    if ratio == 0.0:
        return 0.0
    return table["layers"][name]["loss_increase"][table["grid"].index(ratio)]
