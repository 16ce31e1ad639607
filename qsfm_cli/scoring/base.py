"""What every scorer shares: its interface and the ways it turns collected statistics into orders."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Iterable, Protocol, runtime_checkable

import torch
from torch import nn

from ..collect.base import StatRequest
from ..registry import Registry
from ..similarity import check_metric_options
from ..types import ChannelSet, LayerStats, Order

SCORERS: Registry[type["Scorer"]] = Registry("scorer", "scorer.name")
register_scorer = SCORERS.register
list_scorers = SCORERS.names


def get_scorer(name: str, **options) -> "Scorer":
    """Build scorer ``name`` with ``options`` (each scorer's dataclass fields; defaults for the rest)."""
    return SCORERS.build(name, options)


def threshold_scorers() -> list[str]:
    """Scorers whose orders carry threshold values (what prune.threshold compares)."""
    return [name for name, cls in SCORERS.items() if cls.threshold_rule]


@runtime_checkable
class Scorer(Protocol):
    """Channels of each set in removal order, from collected statistics and/or the model's weights."""

    name: ClassVar[str]
    # Whether the orders' ``values`` support prune.threshold (and allocation=threshold).
    threshold_rule: ClassVar[bool]

    def requests(self) -> set[StatRequest]:
        """What the collector must gather (empty for weight-only scorers)."""

    def options(self) -> dict:
        """JSON-able options, recorded with the results and part of the score cache key."""

    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        """Per channel set name, its ``Order`` (``removal`` lists all channels of the set)."""


@dataclass(frozen=True)
class ScorerOptions:
    """Base of the scorer dataclasses: the fields are the options."""

    name: ClassVar[str] = ""
    threshold_rule: ClassVar[bool] = False

    def options(self) -> dict:
        return asdict(self)

    def requests(self) -> set[StatRequest]:
        """Nothing to collect: the default of the weight-only scorers."""
        return set()


@dataclass(frozen=True)
class FilterScorer(ScorerOptions):
    """Removes first the channels whose filters (across the set's producers) have the lowest
    ``importance``; needs no collected statistics."""

    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        return {cs.name: ascending_order(self.importance(producer_filters(model, cs))) for cs in channel_sets}

    def importance(self, filters: torch.Tensor) -> torch.Tensor:
        """[C] importance of each channel from its [C, D] filters."""
        raise NotImplementedError


@dataclass(frozen=True)
class StatisticScorer(ScorerOptions):
    """Removes first the channels with the lowest value of one collected per-channel statistic
    (``stat``: a statistic kind without options, e.g. ``rank``, ``chip``, whose value has the same name)."""

    stat: ClassVar[str] = ""

    def requests(self) -> set[StatRequest]:
        return {StatRequest(self.stat)}

    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        return {cs.name: ascending_order(collected(cs, stats, self.stat)) for cs in channel_sets}


@dataclass(frozen=True)
class SimilarityOptions(ScorerOptions):
    """Options of a scorer built on the similarity matrix S (see ``similarity.py`` for their meaning)."""

    metric: str = "ssim"
    k1: float = 0.01
    k2: float = 0.03
    window: int = 11
    sigma: float = 1.5

    def __post_init__(self) -> None:
        check_metric_options(self.metric, self.k1, self.k2, self.window, self.sigma)

    @property
    def request(self) -> StatRequest:
        return StatRequest.similarity(self.metric, k1=self.k1, k2=self.k2, window=self.window,
                                      sigma=self.sigma)

    def requests(self) -> set[StatRequest]:
        return {self.request}

    def layer_similarity(self, cs: ChannelSet, stats: dict[str, LayerStats]) -> tuple[torch.Tensor, list[int]]:
        """(S as float64 on the CPU, dead channel indices) of one set, with a clear error when missing."""
        layer = _layer_stats(cs, stats)
        key = self.request.key
        if key not in layer.values:
            raise KeyError(f"no {key!r} similarity collected for {cs.name!r}; collected: "
                           f"{', '.join(layer.values) or 'none'} (collect with this scorer's requests())")
        dead = layer.dead.nonzero().flatten().tolist()
        return layer.values[key].detach().to("cpu", torch.float64), dead

    def score(self, model: nn.Module, channel_sets: list[ChannelSet],
              stats: dict[str, LayerStats]) -> dict[str, Order]:
        return {cs.name: self.order(*self.layer_similarity(cs, stats)) for cs in channel_sets}

    def order(self, sim: torch.Tensor, dead: list[int]) -> Order:
        """The removal order of one set from its S and dead channels."""
        raise NotImplementedError


def checked_dead(dead: Iterable[int], size: int) -> list[int]:
    """Dead channel indices, sorted and unique, with a clear error when one lies outside the set."""
    dead = sorted({int(d) for d in dead})
    if any(not 0 <= d < size for d in dead):
        raise ValueError(f"dead channel indices must lie in [0, {size}), got {dead}")
    return dead


def _layer_stats(cs: ChannelSet, stats: dict[str, LayerStats]) -> LayerStats:
    if cs.name not in stats:
        raise KeyError(f"no statistics collected for channel set {cs.name!r}")
    return stats[cs.name]


def ascending_order(importance: torch.Tensor) -> Order:
    """Remove the least important first; ties keep index order (lower index removed first)."""
    order = torch.sort(importance.detach().cpu().double(), stable=True).indices
    return Order(removal=order.tolist())


def collected(cs: ChannelSet, stats: dict[str, LayerStats], name: str) -> torch.Tensor:
    """A collected value (e.g. ``rank``, ``chip``) of one set, with a clear error when it is missing."""
    values = _layer_stats(cs, stats).values
    if name not in values:
        raise KeyError(f"no {name!r} statistic collected for {cs.name!r} (collect with the scorer's requests())")
    return values[name]


def producer_filters(model: nn.Module, cs: ChannelSet) -> torch.Tensor:
    """[C, D] float64: each channel's filters, concatenated across the set's producers."""
    rows = []
    for path in cs.producers:
        weight = model.get_submodule(path).weight.detach()
        if weight.shape[0] != cs.size:
            raise ValueError(f"producer {path!r} of channel set {cs.name!r} has {weight.shape[0]} output "
                             f"channels, the set has {cs.size}")
        rows.append(weight.reshape(cs.size, -1).to("cpu", torch.float64))
    if not rows:
        raise ValueError(f"channel set {cs.name!r} has no producers to take filter weights from")
    return torch.cat(rows, 1)
