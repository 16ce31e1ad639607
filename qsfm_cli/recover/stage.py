"""Prune and recover stages: the plan's removals applied, in one or more steps, each with the recovery's
fold, removal and refit, then BatchNorm re-estimation; cached as a checked architecture spec and weights."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from ..cache import RunContext, fingerprint
from ..data import ImageSet
from ..plan import keep_from_counts
from ..pruning import apply_keep, architecture, build_model
from ..types import ChannelSet, LayerStats, Orders, SetStatus
from .base import RecoverySpec
from .bn import recalibrate_bn
from .distill import distill

log = logging.getLogger(__name__)

NETWORK = "(network)"   # the recovery status of a step that repairs the whole network, not one set

# (partly pruned model, cache status suffix) -> its channel sets, orders and statistics, re-collected
Rescore = Callable[[nn.Module, str], tuple[list[ChannelSet], Orders, dict[str, LayerStats]]]


def prune_and_recover(model: nn.Module, sets: list[ChannelSet], orders: Orders, stats: dict[str, LayerStats],
                      removed: dict[str, int], spec: RecoverySpec, train_set: ImageSet, ctx: RunContext,
                      example: torch.Tensor, *, rescore: Rescore, seed: int, device: str | torch.device = "cpu",
                      progress: bool = False) -> tuple[nn.Module, dict[str, SetStatus]]:
    """Prune stage and recover stage, in ``spec.iterative_steps`` steps, then distillation and BN
    re-estimation when asked (``prune_and_refit``, then ``finish``). Returns the pruned model and, per set,
    what the recovery did."""
    pruned, status = prune_and_refit(model, sets, orders, stats, removed, spec, train_set, ctx, example,
                                     rescore=rescore, seed=seed, device=device, progress=progress)
    return pruned, {**status, **finish(model, pruned, spec, train_set, ctx, seed=seed, device=device)}


def prune_and_refit(model: nn.Module, sets: list[ChannelSet], orders: Orders, stats: dict[str, LayerStats],
                    removed: dict[str, int], spec: RecoverySpec, train_set: ImageSet, ctx: RunContext,
                    example: torch.Tensor, *, rescore: Rescore, seed: int, device: str | torch.device = "cpu",
                    progress: bool = False) -> tuple[nn.Module, dict[str, SetStatus]]:
    """The plan's removals, reached in ``spec.iterative_steps`` equal steps (removed channels never come
    back). Each step folds (before the channels go), removes, and refits against the model it started from
    (on ``calibration_images`` training images drawn with ``seed``); each later step first re-collects
    statistics and re-scores the partly pruned model through ``rescore`` (cache status ``stats@2``, ...)."""
    method = spec.method
    sizes = {s.name: s.size for s in sets}
    status: dict[str, SetStatus] = {}
    current = model
    for step in range(1, spec.iterative_steps + 1):
        if step > 1:
            sets, orders, stats = rescore(current, f"@{step}")
        target = {name: sizes[name] - round(removed.get(name, 0) * step / spec.iterative_steps) for name in sizes}
        keep = keep_from_counts(orders, sets, {s.name: s.size - target[s.name] for s in sets})
        with ctx.stage("recover"):
            edited = method.folded(current, sets, stats, orders, keep, status)
        with ctx.stage("prune"):
            pruned = apply_keep(edited, keep, example)
        if method.calibration_images:
            with ctx.stage("recover"):
                images = train_set.sample(method.calibration_images, seed)
                status.update(method.refit(current, pruned, sets, keep, images, seed=seed, device=device,
                                           progress=progress))
        current = pruned
    for name, outcome in status.items():
        if not outcome.done:
            log.warning("recovery %s: %s", name, outcome)
    return current, status


def finish(model: nn.Module, pruned: nn.Module, spec: RecoverySpec, train_set: ImageSet, ctx: RunContext, *,
           seed: int, device: str | torch.device = "cpu") -> dict[str, SetStatus]:
    """What applies to the refitted network whatever the method was, in place: distillation on ``model``'s
    logits, then BatchNorm re-estimation. Returns the distillation's status under ``NETWORK`` (if any)."""
    status: dict[str, SetStatus] = {}
    if spec.distill_steps:
        with ctx.stage("distill"):
            status[NETWORK] = SetStatus(True, distill(
                model, pruned, train_set.sample(spec.distill_images, seed), steps=spec.distill_steps,
                lr=spec.distill_lr, batch_size=spec.distill_batch_size, device=device, seed=seed))
    if spec.bn_images:
        with ctx.stage("recover"):
            recalibrate_bn(pruned, train_set, spec.bn_images, batch_size=spec.bn_batch_size, device=device,
                           seed=seed)
    return status


def cached_prune_and_recover(model: nn.Module, sets: list[ChannelSet], orders: Orders,
                             stats: dict[str, LayerStats], removed: dict[str, int], spec: RecoverySpec,
                             train_set: ImageSet, ctx: RunContext, example: torch.Tensor, *, key: str,
                             rescore: Rescore, seed: int, device: str | torch.device = "cpu",
                             progress: bool = False) -> tuple[nn.Module, dict[str, SetStatus]]:
    """``prune_and_recover``, cached in two entries (``outputs.save_pruned``'s form: checked architecture spec
    and weights): the refitted network, keyed by ``key`` (what the scores and ``rescore`` depend on), the
    removals, the method, the training images and the seed; then, when ``finish`` has work, the finished
    one, keyed by the first key and the whole recovery. Recipes that differ only in their distillation or
    BatchNorm re-estimation thus share one refit."""
    refit_spec = replace(spec, distill_steps=0, bn_images=0)
    refit_key = fingerprint("recovered", key, removed, refit_spec.describe(), train_set.content_key(), seed)

    def refit() -> dict[str, Any]:
        return _entry(*prune_and_refit(model, sets, orders, stats, removed, spec, train_set, ctx, example,
                                       rescore=rescore, seed=seed, device=device, progress=progress))

    entry = ctx.cached("recovered", refit_key, refit)
    if refit_spec != spec:
        def finished() -> dict[str, Any]:
            pruned, status = _model(entry, device)
            return _entry(pruned, {**status, **finish(model, pruned, spec, train_set, ctx, seed=seed,
                                                       device=device)})

        entry = ctx.cached("recovered", fingerprint("finished", refit_key, spec.describe()), finished,
                           status="finished")
    return _model(entry, device)


def _entry(pruned: nn.Module, status: dict[str, SetStatus]) -> dict[str, Any]:
    return {"architecture": architecture(pruned), "state_dict": pruned.state_dict(),
            "status": {name: str(done) for name, done in status.items()}}


def _model(entry: dict[str, Any], device: str | torch.device) -> tuple[nn.Module, dict[str, SetStatus]]:
    pruned = build_model(entry["architecture"], entry["state_dict"])
    pruned.load_state_dict(entry["state_dict"])
    return pruned.to(device).eval(), {name: SetStatus.parse(text) for name, text in entry["status"].items()}
