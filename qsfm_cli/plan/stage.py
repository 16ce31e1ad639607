"""Plan stage: the plan record of a run, with the sensitivity table measured (and cached) where the
plan reads one."""
from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..cache import RunContext, fingerprint
from ..counting import MacsMeter
from ..data import ImageSet
from ..evaluate import divergence_from
from ..pruning import apply_keep
from ..types import ChannelSet, Keep, LayerStats, Orders
from .base import make_keep
from .sensitivity import format_sensitivity, measure_sensitivity
from .spec import PlanSpec

log = logging.getLogger(__name__)
# What the sensitivity table measures: no label is read in the plan.
LOSS = "KL(original || pruned) of the class probabilities on held-out training images"


class Fold(Protocol):
    """What the plan stage uses of a recovery (``recover.Recovery``): the fold in force while a sensitivity
    table prunes one set alone."""

    name: str

    def sensitivity_fold(self) -> "Fold": ...

    def fold_key(self) -> Any: ...

    def folded(self, model: nn.Module, sets: list[ChannelSet], stats: dict[str, LayerStats], orders: Orders,
               keep: Keep) -> nn.Module: ...


def plan_stage(model: nn.Module, sets: list[ChannelSet], orders: Orders, stats: dict[str, LayerStats],
               spec: PlanSpec, recovery: Fold, ctx: RunContext, example: torch.Tensor, *, orders_key: str,
               held_out: Callable[[], ImageSet], prepared: Any = None, device: str | torch.device = "cpu",
               progress: bool = False) -> dict[str, Any]:
    """The plan record (its ``removed`` counts drive the prune stage). Where the plan reads a sensitivity
    table (``spec.needs_sensitivity``), the table is measured with the fold of ``recovery``'s
    ``sensitivity_fold()`` in force, as each pruned copy's divergence from ``model`` (``LOSS``) on the
    images ``held_out()`` returns, once per scores (``orders_key``), images, fold and plan fields it
    depends on (``PlanSpec.sensitivity_key``), then cached. ``prepared``: what the protocol measured on the
    architecture before (``Strategy.prepare``)."""
    if not spec.needs_sensitivity:
        return make_keep(orders, sets, spec, model=model, example_input=example, prepared=prepared,
                         cached=ctx.cached)[1]
    fold = recovery.sensitivity_fold()
    if fold is not recovery:
        log.info("sensitivity: each set pruned alone with recover=%s's fold standing in for recover=%s",
                 fold.name, recovery.name)

    def prune_fn(keep: Keep) -> nn.Module:
        return apply_keep(fold.folded(model, sets, stats, orders, keep), keep, example)

    images = held_out()
    loss_of = divergence_from(model, images, device=device)
    # The table depends on the recovery only through the fold in force there.
    key = fingerprint("sensitivity", orders_key, spec.sensitivity_key(), images.images, LOSS, fold.fold_key())
    sensitivity = ctx.cached("sensitivity", key, lambda: measure_sensitivity(
        sets, orders, spec.sensitivity_grid, prune_fn, loss_of, MacsMeter(model, example), spec.min_channels,
        round_to=spec.round_to, progress=progress))
    log.info("sensitivity (loss increase per ratio):\n%s", format_sensitivity(sensitivity))
    plan_info = make_keep(orders, sets, spec, model=model, example_input=example, loss_of=loss_of,
                          prune_fn=prune_fn, sensitivity=sensitivity, prepared=prepared, cached=ctx.cached)[1]
    return {**plan_info, "sensitivity_fold": fold.name, "sensitivity_loss": LOSS}
