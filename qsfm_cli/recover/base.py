"""What every recovery shares: its interface and the settings that apply whatever the method."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..data import ImageSet
from ..collect.base import StatRequest
from ..registry import Registry
from ..types import ChannelSet, Keep, LayerStats, Orders, SetStatus


@dataclass(frozen=True)
class Recovery:
    """A post-training repair of a pruned network: no labels, no fine-tuning. The dataclass fields are the
    method's options (recorded with every result and part of the cache keys).

    A method acts at one or both of two moments:
    - ``fold``: before physical removal, editing a copy of the unpruned model in place from the statistics
      it ``requests()`` (e.g. folding removed maps into their consumers);
    - ``refit``: after removal, fitting the pruned model's kept weights to the original network on
      ``calibration_images`` unlabeled training images (drawn with the run's ``seed``, which also seeds any
      sampling the refit does), never changing a shape.
    Both return, per channel set they looked at, a ``SetStatus``: what was done (e.g. "compensated"), or why not.
    """

    name: ClassVar[str] = ""
    calibration_images: ClassVar[int] = 0     # images ``refit`` needs; 0: it needs none
    repairs: ClassVar[bool] = True            # False: the network is left as pruning leaves it

    def options(self) -> dict[str, Any]:
        return asdict(self)

    def requests(self) -> set[StatRequest]:
        return set()

    def requests_with(self, sensitivity: bool) -> set[StatRequest]:
        """The statistics to collect for this recovery: its own ``requests()`` and, when the plan measures
        a sensitivity table (``sensitivity``), those of its ``sensitivity_fold()``."""
        return set(self.requests()) | (self.sensitivity_fold().requests() if sensitivity else set())

    @property
    def has_fold(self) -> bool:
        return type(self).fold is not Recovery.fold

    def fold_key(self) -> tuple[str, dict[str, Any]] | None:
        """What a model edited by this method's fold depends on beyond its inputs (None: no fold)."""
        return (self.name, self.options()) if self.has_fold else None

    def folded(self, model: nn.Module, sets: list[ChannelSet], stats: dict[str, LayerStats], orders: Orders,
               keep: Keep, status: dict[str, SetStatus] | None = None) -> nn.Module:
        """A copy of ``model`` with the fold applied for ``keep`` (``model`` itself when the method has no
        fold); what the fold did per set goes into ``status``."""
        if not self.has_fold:
            return model
        edited = copy.deepcopy(model)
        done = self.fold(edited, sets, stats, orders, keep)
        if status is not None:
            status.update(done)
        return edited

    def fold(self, model: nn.Module, sets: list[ChannelSet], stats: dict[str, LayerStats], orders: Orders,
             keep: Keep) -> dict[str, SetStatus]:
        return {}

    def refit(self, original: nn.Module, pruned: nn.Module, sets: list[ChannelSet], keep: Keep,
              images: ImageSet, *, seed: int, device: str | torch.device = "cpu",
              progress: bool = False) -> dict[str, SetStatus]:
        return {}

    def sensitivity_fold(self) -> "Recovery":
        """The recovery whose fold is in force when a sensitivity table prunes one set alone: this one. A
        refit would cost one reconstruction per table entry; a method that has one names a fold that stands
        in for it."""
        return self


RECOVERIES: Registry[type[Recovery]] = Registry("recovery", "recover.name")
register_recovery = RECOVERIES.register
list_recoveries = RECOVERIES.names


@register_recovery
@dataclass(frozen=True)
class NoRecovery(Recovery):
    """The pruned network as it comes out of pruning: the method's raw output."""

    name = "none"
    repairs = False


@dataclass(frozen=True)
class RecoverySpec:
    """The ``recover/`` config group as plain values: the method, then what applies whatever it is.

    ``bn_images``: re-estimate every BatchNorm's statistics on this many training images after the method
    (0: off); ``iterative_steps``: reach the plan in this many prune-and-recover steps, re-collecting
    statistics before each; ``distill_steps``: then train the whole pruned network on the original's logits
    for this many Adam steps (``distill.py``; 0: off) on ``distill_images`` unlabeled training images.
    """

    method: Recovery = field(default_factory=NoRecovery)
    bn_images: int = 0
    bn_batch_size: int = 128
    iterative_steps: int = 1
    distill_steps: int = 0
    distill_images: int = 2048
    distill_lr: float = 1e-4
    distill_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.bn_images != 0 and self.bn_images < 2:
            raise ValueError(f"recover.bn_images={self.bn_images}; accepted: 0 (off) or at least 2 images")
        if self.bn_batch_size < 1:
            raise ValueError(f"recover.bn_batch_size={self.bn_batch_size}; accepted: >= 1")
        if self.iterative_steps < 1:
            raise ValueError(f"recover.iterative_steps={self.iterative_steps}; accepted: >= 1")
        if self.distill_steps < 0:
            raise ValueError(f"recover.distill_steps={self.distill_steps}; accepted: >= 0 (0: off)")
        if self.distill_images < 1 or self.distill_batch_size < 1:
            bad = "distill_images" if self.distill_images < 1 else "distill_batch_size"
            raise ValueError(f"recover.{bad}={getattr(self, bad)}; accepted: >= 1")
        if not self.distill_lr > 0:
            raise ValueError(f"recover.distill_lr={self.distill_lr}; accepted: > 0")

    @property
    def is_raw(self) -> bool:
        """Whether the pruned network is left as pruning leaves it (label "none")."""
        return (not self.method.repairs and not self.bn_images and not self.distill_steps
                and self.iterative_steps == 1)

    @property
    def label(self) -> str:
        """How a result was recovered, for every table and plot: "none", "lstsq+bn", "sequential", ..."""
        parts = [self.method.name] if self.method.name != "none" else []
        if self.bn_images:
            parts.append("bn")
        if self.iterative_steps > 1:
            parts.append(f"{self.iterative_steps}steps")
        if self.distill_steps:
            parts.append(f"distill{self.distill_steps}")
        return "+".join(parts) or "none"

    def distillation(self) -> dict[str, Any]:
        """The distillation's settings, empty when it is off."""
        if not self.distill_steps:
            return {}
        return {"distill_steps": self.distill_steps, "distill_images": self.distill_images,
                "distill_lr": self.distill_lr, "distill_batch_size": self.distill_batch_size}

    def describe(self) -> dict[str, Any]:
        return {"recovery": self.method.name, "recovery_options": self.method.options(),
                "bn_images": self.bn_images, "iterative_steps": self.iterative_steps, **self.distillation(),
                "recovery_label": self.label}


_SHARED = ("bn_images", "bn_batch_size", "iterative_steps", "distill_steps", "distill_images", "distill_lr",
           "distill_batch_size")


def get_recovery(name: str = "none", **options) -> RecoverySpec:
    """The recovery ``name`` with its ``options`` (the method's dataclass fields; defaults for the rest)
    and the settings every method shares (``RecoverySpec``'s fields)."""
    shared = {key: options.pop(key) for key in _SHARED if key in options}
    method = RECOVERIES.build(name, options, also=_SHARED)
    return RecoverySpec(method, **shared)


class Tuning:
    """Parameters made trainable for a bounded tuning (a block's Adam steps, a distillation), put back as
    they were unless the tuning lowered its error; either way their gradient flags are restored."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.saved = [(p.detach().clone(), p.requires_grad) for p in params]
        for p in params:
            p.requires_grad_(True)

    @torch.no_grad()
    def finish(self, keep: bool) -> None:
        for p, (value, requires_grad) in zip(self.params, self.saved):
            if not keep:
                p.copy_(value)
            p.requires_grad_(requires_grad)
            p.grad = None
