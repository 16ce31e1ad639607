"""What every statistic shares: the request that asks for it, the accumulator interface, the registry.

A statistic is a class in its own module of this package, registered with ``@register_statistic`` under
its ``kind``; the collector builds one instance per (channel set, request) and feeds it every batch's maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import Registry

STATISTICS: Registry[type["Statistic"]] = Registry("statistic", "statistic", name_of=lambda cls: cls.kind)
register_statistic = STATISTICS.register
get_statistic = STATISTICS.get
list_statistics = STATISTICS.names


@dataclass(frozen=True)
class StatRequest:
    """One statistic the collector must gather for every channel set (hashable, so requests merge).

    ``kind`` names a registered statistic; ``metric`` and ``params`` are its options (empty for most),
    checked by the statistic on construction.
    """

    kind: str
    metric: str = ""
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        get_statistic(self.kind).check(self)

    @classmethod
    def similarity(cls, metric: str = "ssim", *, k1: float = 0.01, k2: float = 0.03, window: int = 11,
                   sigma: float = 1.5) -> "StatRequest":
        """S for ``metric`` (see ``qsfm_cli.collect.similarity``)."""
        return get_statistic("similarity").request(metric, k1=k1, k2=k2, window=window, sigma=sigma)

    @classmethod
    def rank(cls) -> "StatRequest":
        return cls("rank")

    @classmethod
    def chip(cls) -> "StatRequest":
        return cls("chip")

    @classmethod
    def moments(cls) -> "StatRequest":
        return cls("moments")

    @property
    def key(self) -> str:
        """Name of this request's value in ``LayerStats.values`` and of its count in ``LayerStats.counted``."""
        return get_statistic(self.kind).key(self)


class Statistic:
    """Accumulates one requested statistic of one channel set's maps, batch by batch.

    ``update`` gets each batch's maps ``[N, C, H, W]`` (floating point, on the collection device) and keeps
    only running sums, so that no map outlives its batch; ``result`` returns the named values, on the CPU,
    once every batch was seen; ``counted`` is the number of images that entered them.
    """

    kind: ClassVar[str] = ""

    def __init__(self, request: StatRequest, channels: int):
        self.request = request
        self.channels = channels
        self.counted = 0

    @classmethod
    def check(cls, request: StatRequest) -> None:
        """Raise ``ValueError`` naming what is wrong with the request's options; by default it takes none."""
        if request.metric or request.params:
            raise ValueError(f"statistic {cls.kind!r} takes no metric or params, got metric={request.metric!r}, "
                             f"params={dict(request.params)}")

    @classmethod
    def key(cls, request: StatRequest) -> str:
        return cls.kind

    def update(self, maps: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MeanStatistic(Statistic):
    """A statistic that is a mean over images: ``batch_sums`` gives each batch's sums over its images (in
    float64, so that long runs do not drift) and how many images entered them; each value is its total
    divided by the images counted (zeros when none was)."""

    def __init__(self, request: StatRequest, channels: int):
        super().__init__(request, channels)
        self.sums: dict[str, torch.Tensor] = {}

    def batch_sums(self, maps: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        raise NotImplementedError

    def update(self, maps: torch.Tensor) -> None:
        sums, counted = self.batch_sums(maps)
        self.counted += counted
        for name, value in sums.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def result(self) -> dict[str, torch.Tensor]:
        return {name: total.cpu() / max(self.counted, 1) for name, total in self.sums.items()}
