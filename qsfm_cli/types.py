"""The few plain types that flow between the pipeline's stages (README.md, "The stages")."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ChannelSet:
    """A set of channels that must be pruned together.

    ``name`` is the module path of the first producing conv; ``producers`` are all convs whose output
    channels are these channels (several for a residual stream). The map the consumers read is taken at
    module ``tap``: its input (forward pre-hook) when ``tap_input`` is true, else its output.
    ``consumers`` are the conv/linear modules that read that map directly, so a compensation can be folded
    into their weights; empty when the reader is anything else (compensation is then skipped).
    ``consumer_norms[k]`` is the BatchNorm that reads ``consumers[k]``'s output ("" if none): where a
    compensation's constant goes when the consumer has no bias. ``kind`` is ``"conv"`` (one producing
    conv, possibly followed by depthwise convs), ``"stream"`` (a residual stream or a map added into one)
    or ``"concat"`` (a map concatenated with others).
    """

    name: str
    size: int
    producers: tuple[str, ...]
    tap: str
    tap_input: bool = True
    consumers: tuple[str, ...] = ()
    kind: str = "conv"
    consumer_norms: tuple[str, ...] = ()


@dataclass
class LayerStats:
    """What the collector accumulated for one channel set over ``num_images`` images.

    ``dead`` is always filled; ``values`` holds what was requested, under the names each statistic gives
    (``qsfm_cli.collect``): the request's ``key`` for one value (``"rank"``, ``"chip"``, a similarity's
    metric), ``"mean"`` and ``"gram"`` for the moments.
    """

    num_images: int
    dead: torch.Tensor                                   # [C] bool: map constant on every image
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # value name -> mean over counted images
    counted: dict[str, int] = field(default_factory=dict)          # request key -> images counted


@dataclass
class Order:
    """Channels of one set in the order they should be removed.

    ``values[k]`` is what the scorer's threshold rule compares with ``tau`` for the k-th removal (removal
    continues while ``values[k] >= tau``); ``None`` when the scorer has no threshold rule. ``twins[k]`` is the
    kept partner of ``removal[k]`` (QSFM), ``-1`` when it has none.
    """

    removal: list[int]
    values: list[float] | None = None
    twins: list[int] | None = None


Orders = dict[str, Order]
Keep = dict[str, list[int]]


@dataclass(frozen=True)
class SetStatus:
    """What a recovery did to one channel set: ``done`` and what it did ("compensated", "refit; ..."), or
    not done and why. ``str()`` is the text ``metrics.json`` records ("skipped: <why>" when not done)."""

    done: bool
    what: str

    @classmethod
    def skipped(cls, why: str) -> "SetStatus":
        return cls(False, why)

    @classmethod
    def parse(cls, text: str) -> "SetStatus":
        """The status ``str()`` wrote."""
        why = text.removeprefix(_SKIPPED)
        return cls(why == text, why)

    def __str__(self) -> str:
        return self.what if self.done else _SKIPPED + self.what


_SKIPPED = "skipped: "
