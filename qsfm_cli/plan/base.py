"""What every protocol shares: the registry, the context a protocol plans in, and how a removal count is
settled against ``min_channels`` and ``round_to``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from ..counting import MacsMeter
from ..pruning import apply_keep
from ..registry import Registry
from ..types import ChannelSet, Keep, Orders

if TYPE_CHECKING:
    from .spec import PlanSpec

_EPS = 1e-9                # floor(r * C) is taken on r * C + _EPS so that 0.57 * 100 removes 57, not 56

Counts = dict[str, int]    # channels removed per set: the first counts[name] of its removal order


def removed_count(ratio: float, size: int) -> int:
    """Channels a ratio removes from a set of ``size``: floor(ratio * size), robust to 0.57 * 100 = 56.99..."""
    return math.floor(ratio * size + _EPS)


def settle(count: int, size: int, min_channels: int = 1, round_to: int = 1) -> int:
    """The removal count a set of ``size`` takes when a protocol asks for ``count``: never more, so that it
    keeps at least ``min_channels`` and a multiple of ``round_to`` channels (the kept count is rounded up),
    or the whole set where that multiple would not be below ``size``."""
    kept = size - max(0, min(count, size - min_channels))
    kept = -(-kept // round_to) * round_to
    return size - kept if kept < size else 0


def step_up(count: int, size: int, min_channels: int = 1, round_to: int = 1) -> int | None:
    """The next larger removal count a set can settle on after ``count``; None when there is none."""
    return next((n for c in range(count + 1, size + 1) if (n := settle(c, size, min_channels, round_to)) > count),
                None)


def smallest_kept(size: int, min_channels: int = 1, round_to: int = 1) -> int:
    """The fewest channels a set of ``size`` can keep; ``size`` when it cannot be pruned at all."""
    return size - settle(size, size, min_channels, round_to)


def keep_from_counts(orders: Orders, sets: list[ChannelSet], counts: Counts) -> Keep:
    """Per set, the sorted channels left when the first ``counts[name]`` of its removal order are removed."""
    keep = {}
    for s in sets:
        removed = set(orders[s.name].removal[:counts[s.name]])
        keep[s.name] = [c for c in range(s.size) if c not in removed]
    return keep


@dataclass
class PlanContext:
    """Everything a protocol may plan with. ``model``/``example_input`` count MACs (and give the paper rate
    layouts); ``loss_of`` measures a pruned copy, built by ``prune_fn`` (default: ``apply_keep`` without
    compensation); ``sensitivity`` is a table measured before; ``progress`` shows bars for long loops; ``prepared`` is what
    the protocol's ``prepare`` returned (a latency table); ``cached(kind, key, compute)`` keeps what a
    protocol measures (a speed-up) for the next run with the same plan."""

    orders: Orders
    sets: list[ChannelSet]
    spec: PlanSpec
    model: nn.Module | None = None
    example_input: torch.Tensor | None = None
    loss_of: Callable[[nn.Module], float] | None = None
    prune_fn: Callable[[Keep], nn.Module] | None = None
    sensitivity: dict[str, Any] | None = None
    progress: bool = False
    prepared: Any = None
    cached: Callable[[str, str, Callable[[], Any]], Any] | None = None
    _meter: MacsMeter | None = field(default=None, init=False, repr=False)

    def settled(self, counts: Counts) -> Counts:
        """``counts`` after ``min_channels`` and ``round_to`` (see ``settle``)."""
        spec = self.spec
        return {s.name: settle(counts[s.name], s.size, spec.min_channels, spec.round_to) for s in self.sets}

    def pruned(self, counts: Counts) -> nn.Module:
        return self.pruner()(keep_from_counts(self.orders, self.sets, counts))

    def shapes(self, counts: Counts) -> nn.Module:
        """The pruned copy without any fold (``prune_fn``'s edits change weights, never shapes): what MACs
        and parameters are counted on."""
        model, example = self.needs_model()
        return apply_keep(model, keep_from_counts(self.orders, self.sets, counts), example)

    def pruner(self) -> Callable[[Keep], nn.Module]:
        if self.prune_fn is None:
            model, example = self.needs_model()
            self.prune_fn = lambda keep: apply_keep(model, keep, example)
        return self.prune_fn

    def meter(self) -> MacsMeter:
        if self._meter is None:
            self._meter = MacsMeter(*self.needs_model())
        return self._meter

    def needs_model(self) -> tuple[nn.Module, torch.Tensor]:
        if self.model is None or self.example_input is None:
            raise ValueError(f"prune.{self.spec.protocol} needs the model and an example input to count MACs")
        return self.model, self.example_input


class Strategy:
    """One protocol: how removal orders become per-set removal counts.

    ``name`` is also the ``PlanSpec`` field that selects the protocol: it applies when that field is set
    (not None); the strategy with ``default = True`` applies when no other one is selected.
    """

    name: ClassVar[str]
    default: ClassVar[bool] = False

    def check(self, spec: PlanSpec) -> None:
        """Checks of the protocol's own fields that need nothing but the spec (run at construction)."""

    def uses_threshold(self, spec: PlanSpec) -> bool:
        """Whether the plan compares the scorer's ``Order.values`` with a threshold."""
        return False

    def validate(self, spec: PlanSpec, sets: list[ChannelSet], model: nn.Module | None) -> None:
        """Checks that need the channel sets (and, where given, the model), before any statistics."""

    def needs_sensitivity(self, spec: PlanSpec) -> bool:
        """Whether the plan reads a sensitivity table (``PlanContext.sensitivity``), which the caller
        measures first with the recovery's sensitivity fold in force."""
        return False

    def prepare(self, spec: PlanSpec, model: nn.Module, example: torch.Tensor, sets: list[ChannelSet],
                cached: Callable[[str, str, Callable[[], Any]], Any], *, device: str | torch.device = "cpu",
                progress: bool = False) -> Any:
        """What the protocol measures on the architecture alone (weights unneeded), before any statistics:
        its value reaches ``counts`` as ``ctx.prepared``. ``cached(kind, key, compute)`` stores it. A plan
        this shows to be impossible fails here."""
        return None

    def verify(self, spec: PlanSpec, base: nn.Module, pruned: nn.Module, info: dict[str, Any], *,
               device: str | torch.device = "cpu") -> dict[str, Any] | None:
        """After pruning: what the protocol promised, checked on the pruned model (None: nothing to check)."""
        return None

    def counts(self, ctx: PlanContext) -> tuple[Counts, dict[str, Any]]:
        """The removal count of every set of ``ctx.sets`` and what the plan record should hold beside them.
        ``make_keep`` settles the counts (``PlanContext.settled``); a protocol that measures pruned copies
        settles its candidates itself, so that it measures what will be pruned."""
        raise NotImplementedError


PROTOCOLS: Registry[Strategy] = Registry("protocol", "protocol")


def register_protocol(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a protocol available to ``PlanSpec`` under ``cls.name``."""
    PROTOCOLS.register(cls())
    return cls


def make_keep(orders: Orders, sets: list[ChannelSet], plan: PlanSpec, *, model: nn.Module | None = None,
              example_input: torch.Tensor | None = None,
              loss_of: Callable[[nn.Module], float] | None = None,
              prune_fn: Callable[[Keep], nn.Module] | None = None,
              sensitivity: dict | None = None, prepared: Any = None, progress: bool = False,
              cached: Callable[[str, str, Callable[[], Any]], Any] | None = None) -> tuple[Keep, dict[str, Any]]:
    """Kept channel indices of every set in ``sets``, and a JSON-able record of the plan.

    ``model``/``example_input`` are needed by the MACs target (and give the paper rate layouts);
    ``loss_of`` (e.g. ``evaluate.divergence_from``) by ``allocation=sensitivity``, which prunes through
    ``prune_fn`` (default: ``apply_keep`` without compensation) and reuses a ``sensitivity`` table when
    given; ``prepared`` is what the protocol's ``prepare`` measured (``prune.target_speedup``: the latency
    table); ``progress`` shows a bar while the sensitivity table is measured; ``cached`` keeps what the
    protocol measures (``RunContext.cached``), so that the same plan comes out again. The record holds the removal counts,
    what a search reached, notes, and the sensitivity table.
    """
    missing = [s.name for s in sets if s.name not in orders]
    if missing:
        raise ValueError(f"no removal order for channel set(s) {', '.join(missing)}")
    plan.validate(sets)
    ctx = PlanContext(orders, sets, plan, model=model, example_input=example_input, loss_of=loss_of,
                      prune_fn=prune_fn, sensitivity=sensitivity, progress=progress, prepared=prepared,
                      cached=cached)
    counts, found = plan.strategy.counts(ctx)
    counts = ctx.settled(counts)   # settling is idempotent: counts a protocol settled itself stay as they are
    info: dict[str, Any] = {"protocol": plan.protocol, "notes": [], **found, "removed": counts}
    return keep_from_counts(orders, sets, counts), info
