"""``PlanSpec``: the ``prune/`` config group as plain, checked values."""
from __future__ import annotations

import numbers
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Protocol, Sequence

from torch import nn

from ..pruning import SCOPES
from ..types import ChannelSet
from .base import PROTOCOLS, Strategy, smallest_kept

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Marks a field that only chooses how many channels each set loses: a sensitivity table (every set pruned
# alone at every ratio of the grid) does not depend on it, so one table serves every target.
COUNTS_ONLY = {"counts_only": True}


class ScorerTraits(Protocol):
    """What the plan reads of a scorer: its name and whether it declares a threshold rule."""

    name: str
    threshold_rule: bool


@dataclass(frozen=True)
class PlanSpec:
    """How many channels each set loses, and which (see the ``qsfm_cli.plan`` docstring).

    Every field's type is checked at construction (numbers are numbers, whole numbers are ints, a bool is
    neither), then its range, so a bad value fails before any statistics are collected.
    """

    ratio: float = field(default=0.5, metadata=COUNTS_ONLY)
    rates: str | tuple[float, ...] | None = field(default=None, metadata=COUNTS_ONLY)
    rate_layout: str | None = field(default=None, metadata=COUNTS_ONLY)
    threshold: float | None = field(default=None, metadata=COUNTS_ONLY)
    target_macs_reduction: float | None = field(default=None, metadata=COUNTS_ONLY)
    target_params_reduction: float | None = field(default=None, metadata=COUNTS_ONLY)
    allocation: str = field(default="uniform", metadata=COUNTS_ONLY)
    sensitivity_grid: tuple[float, ...] = DEFAULT_GRID
    sensitivity_images: int = 256
    scope: str = "default"
    min_channels: int = 1
    round_to: int = 1
    target_speedup: float | None = field(default=None, metadata=COUNTS_ONLY)
    latency_runtime: str = field(default="onnxruntime", metadata=COUNTS_ONLY)
    latency_batch: int = field(default=64, metadata=COUNTS_ONLY)
    latency_threads: int = field(default=1, metadata=COUNTS_ONLY)
    latency_repeats: int = field(default=10, metadata=COUNTS_ONLY)
    latency_replans: int = field(default=2, metadata=COUNTS_ONLY)
    speedup_tolerance: float = field(default=0.05, metadata=COUNTS_ONLY)

    def __post_init__(self) -> None:
        _check_types(self)
        if not 0 <= self.ratio < 1:
            raise ValueError(f"prune.ratio={self.ratio}; accepted: a number in [0, 1)")
        chosen = [name for name, s in PROTOCOLS.items() if not s.default and getattr(self, name) is not None]
        if len(chosen) > 1:
            optional = ", ".join(f"prune.{name}" for name, s in PROTOCOLS.items() if not s.default)
            raise ValueError(f"prune.{chosen[0]} and prune.{chosen[1]} are both set; set at most one of {optional}")
        grid = tuple(float(r) for r in self.sensitivity_grid)
        if not grid or any(not 0 < r < 1 for r in grid):
            raise ValueError(f"prune.sensitivity_grid={list(grid)}; accepted: ratios in (0, 1)")
        object.__setattr__(self, "sensitivity_grid", tuple(sorted(set(grid))))
        if self.sensitivity_images < 1:
            raise ValueError(f"prune.sensitivity_images={self.sensitivity_images}; accepted: >= 1")
        if self.scope not in SCOPES:
            raise ValueError(f"prune.scope={self.scope}; accepted: {', '.join(SCOPES)}")
        if self.min_channels < 1:
            raise ValueError(f"prune.min_channels={self.min_channels}; accepted: >= 1")
        if self.round_to < 1:
            raise ValueError(f"prune.round_to={self.round_to}; accepted: >= 1 (1: off)")
        for strategy in PROTOCOLS.values():
            strategy.check(self)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "PlanSpec":
        """From the ``prune`` config mapping (lists welcome where the fields hold tuples)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(names))
        if unknown:
            raise ValueError(f"prune.{unknown[0]}={cfg[unknown[0]]}; accepted: "
                             f"{', '.join(f'prune.{n}' for n in sorted(names))}")
        return cls(**cfg)

    @property
    def strategy(self) -> Strategy:
        return next((s for name, s in PROTOCOLS.items() if not s.default and getattr(self, name) is not None),
                    next(s for s in PROTOCOLS.values() if s.default))

    @property
    def protocol(self) -> str:
        return self.strategy.name

    @property
    def uses_threshold(self) -> bool:
        """Whether the plan compares the scorer's ``Order.values`` with a threshold."""
        return self.strategy.uses_threshold(self)

    @property
    def needs_sensitivity(self) -> bool:
        """Whether the plan reads a sensitivity table, measured before it (``plan_stage``)."""
        return self.strategy.needs_sensitivity(self)

    def sensitivity_key(self) -> dict[str, Any]:
        """What a sensitivity table measured under this plan depends on: every field but those marked
        ``COUNTS_ONLY``, so a field added later is part of the key unless it is marked."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("counts_only")}

    def describe(self) -> dict[str, Any]:
        """The fields a results row shows (scalars and strings only, so that reports can group on them)."""
        rates = self.rates if isinstance(self.rates, (str, type(None))) else str(list(self.rates))
        return {"protocol": self.protocol, "ratio": self.ratio if self.protocol == "ratio" else None,
                "rates": rates, "rate_layout": self.rate_layout,
                "threshold": self.threshold, "target_macs_reduction": self.target_macs_reduction,
                "target_params_reduction": self.target_params_reduction,
                "target_speedup": self.target_speedup,
                "allocation": self.allocation, "scope": self.scope, "min_channels": self.min_channels,
                "round_to": self.round_to}

    def validate(self, sets: list[ChannelSet], model: nn.Module | None = None, *,
                 scorer: ScorerTraits | None = None, threshold_scorers: Sequence[str] = ()) -> None:
        """Checks that need the channel sets or the scorer, done before any statistics are collected.

        ``scorer`` is anything with ``name`` and ``threshold_rule`` (a scorer instance does); whether it
        declares a threshold rule is checked when the protocol compares ``Order.values`` with one, and
        ``threshold_scorers`` (the names of those that do) completes the message. The protocol's own
        checks that depend on the model (a rate list's layout) run only with ``model``.
        """
        if not sets:
            raise ValueError(f"prune.scope={self.scope} has no prunable channel set in this model")
        if self.uses_threshold and scorer is not None and not scorer.threshold_rule:
            setting = "prune.threshold" if self.protocol == "threshold" else "prune.allocation=threshold"
            accepted = f"; scorers with one: {', '.join(threshold_scorers)}" if threshold_scorers else ""
            raise ValueError(f"{setting} needs a scorer with a threshold rule; scorer {scorer.name!r} has "
                             f"none{accepted}")
        _check_prunable(self, sets)
        self.strategy.validate(self, sets, model)


def _check_prunable(spec: PlanSpec, sets: list[ChannelSet]) -> None:
    """Refuse ``min_channels``/``round_to`` that leave every set whole: the run would prune nothing."""
    if any(smallest_kept(s.size, spec.min_channels, spec.round_to) < s.size for s in sets):
        return
    largest = max(s.size for s in sets)
    where = f"the largest channel set of prune.scope={spec.scope} has {largest} channels"
    if spec.round_to == 1 or all(smallest_kept(s.size, spec.min_channels) == s.size for s in sets):
        raise ValueError(f"prune.min_channels={spec.min_channels} leaves nothing to prune: {where}; accepted: "
                         f"1 to {largest - 1}")
    fits = [n for n in range(1, largest) if any(smallest_kept(s.size, spec.min_channels, n) < s.size for s in sets)]
    raise ValueError(f"prune.round_to={spec.round_to} leaves nothing to prune: {where} and keeps at least "
                     f"prune.min_channels={spec.min_channels}; accepted: {_ranges(fits)}")


def _ranges(values: list[int]) -> str:
    """Sorted whole numbers as runs: [1, 2, 3, 5] -> "1 to 3, 5"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a} to {b}" if b > a else f"{a}" for a, b in runs)


# ------------------------------------------------------------------------------------------ field types
def _check_types(spec: PlanSpec) -> None:
    hints = typing.get_type_hints(type(spec))
    for f in fields(spec):
        value, hint = getattr(spec, f.name), hints[f.name]
        if isinstance(value, list) and any(typing.get_origin(h) is tuple for h in _alternatives(hint)):
            value = tuple(value)
            object.__setattr__(spec, f.name, value)
        if not any(_matches(value, h) for h in _alternatives(hint)):
            raise ValueError(f"prune.{f.name}={value!r}; accepted: "
                             f"{' or '.join(_describe(h) for h in _alternatives(hint))}")


def _alternatives(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _matches(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if hint is str:
        return isinstance(value, str)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    raise TypeError(f"PlanSpec has a field of a type the check does not know: {hint}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])[2:]}s"
    return {type(None): "null", str: "a string", int: "a whole number", float: "a number"}[hint]
