"""The ``rates`` protocol: HRank/CHIP per-layer rate lists, their grammar and their layouts.

A rate string (``"[0.]+[0.15]*2+[0.4]*27"``) expands to a list of rates, mapped onto channel sets by a
layout (``pruning.rate_layouts``, or one entry per set) chosen by the list's length, or by ``rate_layout``
where several layouts have that length; a set keeps int(C * (1 - rate)) channels, as the papers' code
builds its pruned networks.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

from torch import nn

from ..pruning import RateLayout, rate_layouts
from ..types import ChannelSet
from .base import Counts, PlanContext, Strategy, register_protocol

if TYPE_CHECKING:
    from .spec import PlanSpec

MAX_RATES = 10_000         # longest rate list accepted: far above any network's layer count
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(?P<op>[\[\],+*]))")


def parse_rates(text: str | Sequence[float]) -> list[float]:
    """Expand a rate string: ``expr := term ('+' term)*``, ``term := atom ('*' INT)?``,
    ``atom := NUMBER | '[' NUMBER (',' NUMBER)* ']'``. A list of numbers is taken as it is. The expanded
    length is checked before the list is built, so a huge repeat count fails at once."""
    if not isinstance(text, str):
        if len(text) > MAX_RATES:
            raise ValueError(f"prune.rates has {len(text)} entries; at most {MAX_RATES} are accepted")
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

    def too_long(self):
        raise ValueError(f"prune.rates: {self.text!r} expands to more than {MAX_RATES} entries; accepted: at "
                         f"most {MAX_RATES}")

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

    def term(self, before: int) -> list[float]:
        values = self.atom()
        if self.peek() == "*":
            self.take()
            tok = self.peek()
            if tok is None or not tok.isdigit():
                self.fail("a whole repeat count after '*'")
            # The digits are counted first: int() of a very long digit string is itself slow (and refused).
            repeat = int(tok) if len(tok) <= len(str(MAX_RATES)) else MAX_RATES + 1
            if before + len(values) * repeat > MAX_RATES:
                self.too_long()
            self.take()
            values = values * repeat
        if before + len(values) > MAX_RATES:
            self.too_long()
        return values

    def parse(self) -> list[float]:
        values = self.term(0)
        while self.peek() == "+":
            self.take()
            values += self.term(len(values))
        if self.peek() is not None:
            self.fail("'+' or the end")
        return values


# ------------------------------------------------------------------------------------------- layouts
def layouts(sets: list[ChannelSet], model: nn.Module | None) -> list[RateLayout]:
    """The model's published layouts (none without ``model``) and one entry per set of the scope."""
    per_set = RateLayout("per-set", f"one entry per channel set of the scope, in forward order "
                         f"({', '.join(s.name for s in sets[:3])}{', ...' if len(sets) > 3 else ''})",
                         tuple(s.name for s in sets))
    paper = rate_layouts(model) if model is not None else []
    return paper + [per_set]


def choose_layout(rates: list[float], available: list[RateLayout], chosen: str | None) -> RateLayout:
    """The layout named by ``prune.rate_layout``, else the only one with the list's length."""
    if chosen is not None:
        layout = next((lay for lay in available if lay.name == chosen), None)
        if layout is None:
            raise ValueError(f"prune.rate_layout={chosen}; accepted for this model: "
                             f"{', '.join(lay.name for lay in available)}")
        if len(layout.targets) != len(rates):
            raise ValueError(f"prune.rates has {len(rates)} entries; prune.rate_layout={chosen} takes "
                             f"{len(layout.targets)} ({layout.description})")
        return layout
    matching = [lay for lay in available if len(lay.targets) == len(rates)]
    if not matching:
        accepted = "; ".join(f"{len(lay.targets)} ({lay.description})" for lay in available)
        raise ValueError(f"prune.rates has {len(rates)} entries; this model accepts {accepted}")
    if len(matching) > 1:
        names = ", ".join(lay.name for lay in matching)
        described = "; ".join(f"{lay.name} ({lay.description})" for lay in matching)
        raise ValueError(f"prune.rates has {len(rates)} entries, which fits several layouts of this model: "
                         f"{described}; choose one with prune.rate_layout=<{names.replace(', ', '|')}>")
    return matching[0]


def rate_counts(spec: PlanSpec, sets: list[ChannelSet], model: nn.Module | None
                ) -> tuple[Counts, str, list[str]]:
    """Removal counts, the layout's name and notes (entries the layout ignores)."""
    rates = parse_rates(spec.rates)
    layout = choose_layout(rates, layouts(sets, model), spec.rate_layout)
    for k, (target, rate) in enumerate(zip(layout.targets, rates)):
        if not 0 <= rate < 1:
            where = target if target is not None else "an entry its paper's code ignores"
            raise ValueError(f"prune.rates entry {k} ({layout.name} layout: {where}) is {rate}; every rate "
                             "must be in [0, 1)")
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
                             f"prune.scope={spec.scope}; use prune.scope=stage")
        kept = int(sizes[target] * (1 - rate))  # the papers' own rounding
        counts[target] = sizes[target] - kept
    notes = [f"{layout.name} layout: {len(ignored)} nonzero entries (from entry {ignored[0]} on) are ignored, "
             "as in the paper's pruned-model code"] if ignored else []
    return counts, layout.name, notes


@register_protocol
class Rates(Strategy):
    name = "rates"

    def check(self, spec: PlanSpec) -> None:
        if spec.rates is not None:  # parsed here; the range is checked with the layout (``rate_counts``)
            rates = parse_rates(spec.rates)
            if not isinstance(spec.rates, str):
                object.__setattr__(spec, "rates", tuple(rates))
        if spec.rate_layout is not None and spec.rates is None:
            raise ValueError(f"prune.rate_layout={spec.rate_layout} needs prune.rates")

    def validate(self, spec: PlanSpec, sets: list[ChannelSet], model: nn.Module | None) -> None:
        if model is not None:  # the papers' layouts depend on the model; make_keep checks in any case
            rate_counts(spec, sets, model)

    def counts(self, ctx: PlanContext) -> tuple[Counts, dict[str, Any]]:
        counts, layout, notes = rate_counts(ctx.spec, ctx.sets, ctx.model)
        return counts, {"layout": layout, "notes": notes}
