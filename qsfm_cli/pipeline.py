"""One pruning experiment as plain stages: baseline -> collect -> score -> plan -> prune -> fine-tune ->
evaluate -> write. Nothing here reads a config object: ``qsfm_cli.app`` translates the config into an
``Experiment`` and calls ``run_experiment``; Python users can do the same without Hydra.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from . import checkpoints, outputs
from .cache import Cache, fingerprint, model_fingerprint
from .baseline import trained_baseline
from .collect import collect_stats
from .data import ImageSet
from .evaluate import Metrics, accuracy, evaluate, heldout_loss
from .models import create_model
from .recover import recalibrate_bn
from .recover.compensate import MODES, compensate
from .plan import MacsMeter, PlanSpec, format_sensitivity, keep_from_counts, make_keep, measure_sensitivity
from .pruning import apply_keep, channel_sets
from .scoring import Scorer, StatRequest, threshold_scorers
from .train import TrainRecipe, train
from .types import ChannelSet, Keep, LayerStats, Order, Orders

log = logging.getLogger(__name__)

COMPENSATIONS = ("none", *MODES)


@dataclass
class EvalSpec:
    batch_size: int = 500
    latency_batches: tuple[int, ...] = (1, 64)
    latency_repeats: int = 20


@dataclass
class Experiment:
    """Everything one run needs, as plain values."""

    model_name: str
    train_set: ImageSet
    test_set: ImageSet
    scorer: Scorer
    plan: PlanSpec
    run_dir: Path
    model_kwargs: dict[str, Any] = field(default_factory=dict)   # extra create_model arguments
    checkpoint: str | None = None
    pretrained: bool = False
    allow_pickle: bool = False
    baseline_recipe: TrainRecipe | None = None     # trains the baseline when no weights are given
    finetune: TrainRecipe = field(default_factory=lambda: TrainRecipe(epochs=0))
    compensate: str = "none"                       # none | twin | lstsq
    ridge: float = 1e-3
    bn_recalibration: int = 0                      # training images for BatchNorm re-estimation
    iterative_steps: int = 1
    num_images: int = 512
    collect_batch_size: int = 128
    eval: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0
    device: str = "cpu"
    cache_dir: Path | None = None
    resume: bool = False
    save_model: bool = True
    progress: bool = True
    record: dict[str, Any] = field(default_factory=dict)   # extra fields copied into metrics.json

    def __post_init__(self) -> None:
        """Checks of the pipeline's own settings, before any work (the plan checks its own)."""
        checks = [
            (self.compensate in COMPENSATIONS, f"prune.compensate={self.compensate!r}; accepted: "
                                               f"{', '.join(COMPENSATIONS)}"),
            (self.ridge >= 0, f"prune.ridge={self.ridge}; must be >= 0"),
            (self.bn_recalibration == 0 or self.bn_recalibration >= 2,
             f"prune.bn_recalibration={self.bn_recalibration}; accepted: 0 (off) or at least 2 images"),
            (self.iterative_steps >= 1, f"prune.iterative_steps={self.iterative_steps}; must be >= 1"),
            (self.num_images >= 1, f"collect.num_images={self.num_images}; must be >= 1"),
            (self.collect_batch_size >= 1, f"collect.batch_size={self.collect_batch_size}; must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; anything else must name a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ValueError(f"device {name!r} requested but {device.type} is not available; accepted here: auto, cpu")
    return device


def load_baseline(exp: Experiment, cache: Cache) -> nn.Module:
    """Baseline stage: the unpruned model with its weights (file, URL, built-in, or trained once)."""
    model = create_model(exp.model_name, num_classes=exp.train_set.num_classes, **exp.model_kwargs)
    if exp.checkpoint:
        return checkpoints.load_weights(model, exp.checkpoint, allow_pickle=exp.allow_pickle)
    if exp.pretrained:
        return checkpoints.load_weights(model, checkpoints.pretrained_url(exp.model_name))
    if exp.baseline_recipe is not None:
        return trained_baseline(exp.model_name, exp.train_set.num_classes, exp.train_set, exp.test_set,
                                exp.baseline_recipe, seed=exp.seed, device=exp.device,
                                cache_dir=cache.root, model_kwargs=exp.model_kwargs, progress=exp.progress)
    raise ValueError(f"model {exp.model_name!r} has no weights: set model.checkpoint=PATH_OR_URL, "
                     f"model.pretrained=true, or baseline.train=true")


def collect_and_score(model: nn.Module, sets: list[ChannelSet], exp: Experiment, cache: Cache,
                      timings: dict[str, float], cache_log: dict[str, str]
                      ) -> tuple[Orders, dict[str, LayerStats], str]:
    """Collect stage + score stage, each cached by content (model weights, images, options); returns
    the orders, the statistics and the orders' cache key."""
    images = exp.train_set.sample(exp.num_images, exp.seed)
    content_key = fingerprint(model_fingerprint(model), images.images, images.mean, images.std,
                              [asdict(s) for s in sets])
    scorer_requests = set(exp.scorer.requests())
    groups = [scorer_requests, {StatRequest.moments()} if exp.compensate != "none" else set()]
    start = time.perf_counter()
    stats = cached_stats(model, sets, images, [g for g in groups if g], content_key, exp, cache, cache_log)
    timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - start

    def score() -> dict[str, dict]:
        return {name: asdict(o) for name, o in exp.scorer.score(model, sets, stats).items()}

    start = time.perf_counter()
    orders_key = fingerprint("orders", content_key, sorted(map(repr, scorer_requests)), exp.scorer.name,
                             exp.scorer.options())
    raw_orders, hit = cache.get_or_compute("orders", orders_key, score)
    cache_log["orders"] = "hit" if hit else "miss"
    timings["score"] = timings.get("score", 0.0) + time.perf_counter() - start
    return {name: Order(**d) for name, d in raw_orders.items()}, stats, orders_key


def cached_stats(model: nn.Module, sets: list[ChannelSet], images: ImageSet, groups: list[set[StatRequest]],
                 content_key: str, exp: Experiment, cache: Cache, cache_log: dict[str, str]
                 ) -> dict[str, LayerStats]:
    """Statistics for every request group, one cache entry per group (the scorer's requests; the
    compensation's moments), so that runs differing only in compensation share the scorer's entry.
    Whatever groups are missing are collected together in one pass over the images."""
    layout = [f.name for f in fields(LayerStats)]     # entries stored with another layout are not reused
    keys = {fingerprint("stats", content_key, sorted(map(repr, group)), layout): group for group in groups}
    found: dict[str, dict] = {}

    def collect_missing(key: str) -> dict[str, dict]:
        missing = [k for k in keys if k == key or (k not in found and not cache.contains("stats", k))]
        requests = set().union(*(keys[k] for k in missing))
        raw = {name: asdict(st) for name, st in collect_stats(
            model, sets, images, requests, batch_size=exp.collect_batch_size, device=exp.device,
            progress=exp.progress).items()}
        for k in missing:
            if k != key:
                cache.put("stats", k, raw)
                found[k] = raw
        return raw

    hits = []
    for key in keys:
        if key not in found:
            found[key], hit = cache.get_or_compute("stats", key, lambda key=key: collect_missing(key))
            hits.append(hit)
    cache_log["stats"] = "none" if not keys else "hit" if all(hits) else "miss"
    return merge_stats(found.values())


def merge_stats(raws: Iterable[dict[str, dict]]) -> dict[str, LayerStats]:
    """One ``LayerStats`` per set from several collections of it (fields filled in any of them)."""
    merged: dict[str, dict] = {}
    for raw in raws:
        for name, fields in raw.items():
            into = merged.setdefault(name, dict(fields))
            for key, value in fields.items():
                if isinstance(value, dict):
                    into[key] = {**into[key], **value}
                elif into[key] is None:
                    into[key] = value
    return {name: LayerStats(**fields) for name, fields in merged.items()}


def pruner(model: nn.Module, sets: list[ChannelSet], stats: dict[str, LayerStats], orders: Orders,
           exp: Experiment, example: torch.Tensor, comp_log: dict[str, str] | None = None):
    """``keep -> pruned copy of model``, with the run's compensation folded in first."""

    def prune(keep: Keep) -> nn.Module:
        if exp.compensate == "none":
            return apply_keep(model, keep, example)
        edited = copy.deepcopy(model)
        status = compensate(edited, sets, stats, orders, keep, exp.compensate, ridge=exp.ridge)
        if comp_log is not None:
            comp_log.update(status)
        return apply_keep(edited, keep, example)

    return prune


def plan_stage(model: nn.Module, sets: list[ChannelSet], orders: Orders, stats: dict[str, LayerStats],
               orders_key: str, exp: Experiment, cache: Cache, example: torch.Tensor,
               cache_log: dict[str, str]) -> tuple[Keep, dict[str, Any]]:
    """Plan stage. A sensitivity table is measured with the run's compensation in force, once per scores,
    compensation and held-out slice, then cached; MACs searches need no compensation."""
    plan = exp.plan
    if plan.allocation != "sensitivity":
        return make_keep(orders, sets, plan, model=model, example_input=example)
    prune_fn = pruner(model, sets, stats, orders, exp, example)
    loss_of = heldout_loss(exp.train_set, plan.sensitivity_images, skip=exp.num_images, seed=exp.seed,
                           device=exp.device)
    key = fingerprint("sensitivity", orders_key, plan.sensitivity_grid, plan.sensitivity_images,
                      plan.min_channels, plan.round_to, exp.compensate, exp.ridge)
    sensitivity, hit = cache.get_or_compute("sensitivity", key, lambda: measure_sensitivity(
        sets, orders, plan.sensitivity_grid, prune_fn, loss_of, MacsMeter(model, example), plan.min_channels,
        round_to=plan.round_to, progress=exp.progress))
    cache_log["sensitivity"] = "hit" if hit else "miss"
    log.info("sensitivity (loss increase per ratio):\n%s", format_sensitivity(sensitivity))
    return make_keep(orders, sets, plan, model=model, example_input=example, loss_of=loss_of,
                     prune_fn=prune_fn, sensitivity=sensitivity)


def prune_stage(model: nn.Module, sets: list[ChannelSet], orders: Orders, stats: dict[str, LayerStats],
                removed: dict[str, int], exp: Experiment, cache: Cache, example: torch.Tensor,
                timings: dict[str, float], cache_log: dict[str, str]) -> tuple[nn.Module, dict[str, str]]:
    """Prune stage: compensation, physical removal in ``exp.iterative_steps`` steps, BN re-estimation.

    ``removed`` holds the plan's per-set removal counts. Each later step re-collects statistics and
    re-scores the partly pruned model (its cache status is logged as ``stats@2``, ...); the counts are
    reached in equal steps, and removed channels never come back.
    """
    sizes = {s.name: s.size for s in sets}
    comp_log: dict[str, str] = {}
    current = model
    for step in range(1, exp.iterative_steps + 1):
        if step > 1:
            sets = channel_sets(current, example, scope=exp.plan.scope)
            step_log: dict[str, str] = {}
            orders, stats, _ = collect_and_score(current, sets, exp, cache, timings, step_log)
            cache_log.update({f"{kind}@{step}": status for kind, status in step_log.items()})
        target = {name: sizes[name] - round(removed.get(name, 0) * step / exp.iterative_steps) for name in sizes}
        step_keep = keep_from_counts(orders, sets, {s.name: s.size - target[s.name] for s in sets})
        current = pruner(current, sets, stats, orders, exp, example, comp_log)(step_keep)
    for name, status in comp_log.items():
        if status != "compensated":
            log.warning("compensation %s: %s", name, status)
    if exp.bn_recalibration:
        recalibrate_bn(current, exp.train_set, exp.bn_recalibration, batch_size=exp.collect_batch_size,
                       device=exp.device, seed=exp.seed)
    return current, comp_log


def evaluate_stage(model: nn.Module, exp: Experiment, cache: Cache) -> Metrics:
    """Evaluate stage; the accuracy of a model already seen on these test images comes from the cache."""
    spec = exp.eval

    def measure_accuracy() -> list[float]:
        return list(accuracy(model, exp.test_set, device=exp.device, batch_size=spec.batch_size))

    key = fingerprint("accuracy", model_fingerprint(model), exp.test_set.images, exp.test_set.labels,
                      exp.test_set.mean, exp.test_set.std)
    top, _ = cache.get_or_compute("accuracy", key, measure_accuracy)
    return evaluate(model, exp.test_set, device=exp.device, latency_batches=spec.latency_batches,
                    latency_repeats=spec.latency_repeats, known_accuracy=tuple(top))


def run_experiment(exp: Experiment) -> dict[str, Any]:
    """Run every stage and write ``metrics.json``, ``results.csv`` and ``pruned_model.pt`` into
    ``exp.run_dir``; return the metrics record."""
    started = time.perf_counter()
    torch.manual_seed(exp.seed)
    run_dir = Path(exp.run_dir)
    cache = Cache(exp.cache_dir or run_dir / "cache", enabled=exp.cache_dir is not None)
    timings: dict[str, float] = {}
    cache_log: dict[str, str] = {}

    model = load_baseline(exp, cache).to(exp.device).eval()
    example = exp.test_set.images[:1].float().to(exp.device)
    sets = channel_sets(model, example, scope=exp.plan.scope)
    exp.plan.validate(sets, model, scorer=exp.scorer, threshold_scorers=threshold_scorers())

    orders, stats, orders_key = collect_and_score(model, sets, exp, cache, timings, cache_log)
    start, scoring = time.perf_counter(), timings["collect"] + timings["score"]
    _, plan_info = plan_stage(model, sets, orders, stats, orders_key, exp, cache, example, cache_log)
    pruned, comp_log = prune_stage(model, sets, orders, stats, plan_info["removed"], exp, cache, example,
                                   timings, cache_log)
    # Iterative steps collect and score again inside the prune stage: that time is counted there.
    timings["prune"] = time.perf_counter() - start - (timings["collect"] + timings["score"] - scoring)

    start = time.perf_counter()
    base = evaluate_stage(model, exp, cache)
    after_prune = evaluate_stage(pruned, exp, cache)
    timings["evaluate"] = time.perf_counter() - start

    start = time.perf_counter()
    final = after_prune
    if exp.finetune.epochs > 0:
        train(pruned, exp.train_set, exp.test_set, exp.finetune, device=exp.device, seed=exp.seed,
              run_dir=run_dir, resume=exp.resume, progress=exp.progress)
        # Fine-tuning changes weights, not shapes: MACs, params and latency stay those of the pruned model.
        top1, top5 = accuracy(pruned, exp.test_set, device=exp.device, batch_size=exp.eval.batch_size)
        final = replace(after_prune, top1=top1, top5=top5)
    timings["finetune"] = time.perf_counter() - start

    pruned_sets = {s.name: s.size for s in channel_sets(pruned, example, scope=exp.plan.scope)}
    timings["total"] = time.perf_counter() - started
    metrics = {
        "status": "ok",
        **exp.record,
        "model": exp.model_name,
        "scorer": exp.scorer.name,
        "scorer_options": exp.scorer.options(),
        **exp.plan.describe(),
        "compensate": exp.compensate,
        "bn_recalibration": exp.bn_recalibration,
        "iterative_steps": exp.iterative_steps,
        "seed": exp.seed,
        "finetune_epochs": exp.finetune.epochs,
        "base": base.to_dict(),
        "pruned": after_prune.to_dict(),
        "final": final.to_dict(),
        "kept_channels": {s.name: {"kept": pruned_sets.get(s.name, 0), "total": s.size} for s in sets},
        "plan": plan_info,
        "compensation": comp_log,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "cache": cache_log,
    }
    if exp.save_model:
        outputs.save_pruned(run_dir / outputs.PRUNED_FILE, pruned.cpu())
    outputs.write_json(run_dir / outputs.METRICS_FILE, metrics)
    outputs.write_csv(run_dir / outputs.RESULTS_FILE, [outputs.results_row(metrics)])
    return metrics
