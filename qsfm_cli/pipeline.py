"""One pruning experiment as plain stages: baseline -> collect -> score -> plan -> prune -> recover ->
fine-tune -> evaluate, recorded in a ``RunRecord``. Nothing here reads a config object: ``qsfm_cli.app``
translates the config into an ``Experiment`` and calls ``run_experiment``; Python users can do the same
without Hydra.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from . import checkpoints, distributed, limits, outputs
from .files import unwritable
from .baseline import trained_baseline
from .cache import Cache, fingerprint, model_fingerprint
from .collect import collect_stats
from .data import ImageSet
from .evaluate import accuracy, divergence_from, evaluate, evaluate_pair, fidelity
from .export import INT8_FILE, ONNX_FILE, ExportSpec, check_onnx, export_onnx, onnx_accuracy, quantize_int8
from .latency import MIN_REPEATS, RUNTIMES, PairLatency, onnx_pair_latency
from .loaders import input_shape, make_loader
from .models import create_model, pretrained_url
from .models.torchvision_models import load_pretrained
from .plan import MacsMeter, PlanSpec, format_sensitivity, keep_from_counts, make_keep, measure_sensitivity
from .pruning import apply_keep, architecture, build_model, channel_sets
from .record import FAILED, OK, Metrics, Results, RunRecord, Settings, error_text
from .recover import Recovery, RecoverySpec, recalibrate_bn
from .recover.distill import distill
from .scoring import Scorer, StatRequest, threshold_scorers
from .train import Execution, TrainRecipe, check_resumable, train
from .types import ChannelSet, Keep, LayerStats, Order, Orders, SetStatus

if TYPE_CHECKING:
    from .loggers import Logger

log = logging.getLogger(__name__)
T = TypeVar("T")

SEED_LIMIT = 2 ** 63   # torch's generators take any seed below this
# What the sensitivity table measures: no label is read in the plan.
NETWORK = "(network)"   # the recovery status of a step that repairs the whole network, not one set
LOSS = "KL(original || pruned) of the class probabilities on held-out training images"


@dataclass(frozen=True)
class CollectSpec:
    """The ``collect`` config node: training images whose feature maps are collected, and the batch."""

    num_images: int = 512
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("num_images", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"collect.{name}={getattr(self, name)}; accepted: >= 1")


@dataclass(frozen=True)
class EvalSpec:
    """The ``eval`` config node: the accuracy batch, and the batch sizes, repeats and runtimes of the
    latency (base and pruned timed together, ``latency.measure_pair``); ``select_images`` held-out training
    images on which the final model is compared with the unpruned one (0: off), to choose recipes by."""

    batch_size: int = 500
    latency_batches: tuple[int, ...] = (1, 64)
    latency_repeats: int = 20
    runtimes: tuple[str, ...] = ("torch",)
    select_images: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "latency_batches", tuple(self.latency_batches))
        object.__setattr__(self, "runtimes", tuple(self.runtimes))
        if not self.runtimes or any(r not in RUNTIMES for r in self.runtimes):
            raise ValueError(f"eval.runtimes={list(self.runtimes)}; accepted: one or more of {', '.join(RUNTIMES)}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size={self.batch_size}; accepted: >= 1")
        if self.latency_repeats < 1:
            raise ValueError(f"eval.latency_repeats={self.latency_repeats}; accepted: >= 1")
        if self.latency_batches and self.latency_repeats < MIN_REPEATS:
            raise ValueError(f"eval.latency_repeats={self.latency_repeats}; accepted: >= {MIN_REPEATS} (a spread "
                             f"needs them)")
        if self.select_images < 0:
            raise ValueError(f"eval.select_images={self.select_images}; accepted: >= 0 (0: off)")
        if any(b < 1 for b in self.latency_batches):
            raise ValueError(f"eval.latency_batches={list(self.latency_batches)}; accepted: batch sizes >= 1 "
                             f"(an empty list measures no latency)")


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed={seed}; accepted: a whole number in [0, 2**63)")


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
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    execution: Execution = field(default_factory=Execution)
    collect: CollectSpec = field(default_factory=CollectSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    seed: int = 0
    device: str = "cpu"
    cache_dir: Path | None = None
    resume: bool = False
    save_model: bool = True
    progress: bool = True
    dataset_options: dict[str, Any] = field(default_factory=dict)  # what identifies the data beyond its name
    reference: dict[str, Any] | None = None        # a published row shown beside the results
    config: dict[str, Any] | None = None           # the composed config, recorded as it is
    logger: "Logger | None" = None                 # tracks the run (qsfm_cli.loggers; several: Loggers)
    run_name: str | None = None                    # the logger's name of the run (None: the run dir's name)

    def __post_init__(self) -> None:
        check_seed(self.seed)

    @property
    def weights(self) -> str:
        """Where the baseline's weights come from, as one identifying text."""
        if self.checkpoint:
            return str(self.checkpoint)
        if self.pretrained:
            return "pretrained"
        if self.baseline_recipe is not None:
            return f"trained:{fingerprint(self.baseline_recipe.to_dict())[:8]}"
        return "none"

    def settings(self) -> Settings:
        data = self.train_set
        return Settings.of(
            model={"name": self.model_name, "kwargs": self.model_kwargs, "weights": self.weights},
            dataset={"name": data.name, **self.dataset_options, "mean": [round(m, 4) for m in data.mean],
                     "std": [round(s, 4) for s in data.std]},
            scorer=self.scorer, plan=self.plan, recovery=self.recovery, finetune=self.finetune,
            num_images=self.collect.num_images, seed=self.seed)


class RunContext:
    """What a run carries from stage to stage beside its data: the cache, where the time went
    (``timings``, seconds per stage) and what the cache served (``cache_status``, hit/miss per entry kind)."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.timings: dict[str, float] = {}
        self.cache_status: dict[str, str] = {}
        self._nested: list[float] = []   # per open stage, the seconds spent in the stages opened inside it

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``, net of any stage timed inside it (time adds up over calls)."""
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    def cached(self, kind: str, key: str, compute: Callable[[], T], status: str | None = None) -> T:
        """``cache.get_or_compute``, noting hit or miss under ``status`` (default: ``kind``)."""
        value, hit = self.cache.get_or_compute(kind, key, compute)
        self.cache_status[status or kind] = "hit" if hit else "miss"
        return value


def resolve_device(name: str, slot: int = 0) -> torch.device:
    """``auto`` picks CUDA when available, GPU ``slot`` mod the number of GPUs (job k of a sweep whose jobs
    run at once on one machine takes GPU k mod n); anything else must name a usable torch device."""
    if name == "auto":
        return torch.device(f"cuda:{slot % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ValueError(f"device {name!r} requested but {device.type} is not available; accepted here: auto, cpu")
    return device


def sensitivity_images(exp: Experiment) -> ImageSet:
    """The sensitivity table's images: the last ``prune.sensitivity_images`` of the seeded permutation
    whose first images are the collected and calibration ones (``check_splits``)."""
    return exp.train_set.held_out(exp.plan.sensitivity_images, exp.seed)


def select_images(exp: Experiment) -> ImageSet:
    """The held-out images a recipe is chosen by: before the sensitivity images, from the same end."""
    return exp.train_set.held_out(exp.eval.select_images, exp.seed, skip=exp.plan.sensitivity_images)


def check_splits(exp: Experiment) -> None:
    """Refuse, before any work, training splits that would overlap: the statistics, calibration and BatchNorm
    images are the first ones of a seeded permutation of the training images, the sensitivity and selection
    images its last ones."""
    first = {"collect.num_images": exp.collect.num_images,
             "recover.images": exp.recovery.method.calibration_images, "recover.bn_images": exp.recovery.bn_images,
             "recover.distill_images": exp.recovery.distill_images if exp.recovery.distill_steps else 0}
    last = {"prune.sensitivity_images": exp.plan.sensitivity_images if exp.plan.allocation == "sensitivity"
            or exp.eval.select_images else 0, "eval.select_images": exp.eval.select_images}
    if not any(last.values()):
        return
    used = max(first.values()) + sum(last.values())
    if used > len(exp.train_set):
        parts = ", ".join(f"{k}={v}" for k, v in {**first, **last}.items() if v)
        raise ValueError(f"{parts}: {used} training images, this training set has {len(exp.train_set)}; the "
                         f"sensitivity and selection images must be apart from the others: lower them")


def load_baseline(exp: Experiment, cache: Cache) -> nn.Module:
    """Baseline stage: the unpruned model with its weights (file, URL, built-in, or trained once)."""
    model = create_model(exp.model_name, num_classes=exp.train_set.num_classes, **exp.model_kwargs)
    if exp.checkpoint:
        return checkpoints.load_weights(model, exp.checkpoint, allow_pickle=exp.allow_pickle)
    if exp.pretrained and exp.model_name.startswith("tv_"):
        return load_pretrained(model, exp.model_name)     # torchvision's own weights API
    if exp.pretrained:
        return checkpoints.load_weights(model, pretrained_url(exp.model_name))
    if exp.baseline_recipe is not None:
        return trained_baseline(exp.model_name, exp.train_set.num_classes, exp.train_set, exp.test_set,
                                exp.baseline_recipe, seed=exp.seed, device=exp.device, cache_dir=cache.root,
                                model_kwargs=exp.model_kwargs, execution=exp.execution, progress=exp.progress)
    raise ValueError(f"model {exp.model_name!r} has no weights: set model.checkpoint=PATH_OR_URL, "
                     f"model.pretrained=true, or baseline.train=true")


def collect_and_score(model: nn.Module, sets: list[ChannelSet], exp: Experiment, ctx: RunContext,
                      suffix: str = "") -> tuple[Orders, dict[str, LayerStats], str]:
    """Collect stage + score stage, each cached by content (model weights, images, options); returns the
    orders, the statistics and the orders' cache key. ``suffix`` tells apart the cache status of a later
    iterative step ("@2")."""
    images = exp.train_set.sample(exp.collect.num_images, exp.seed)
    content_key = fingerprint(model_fingerprint(model), images.images, images.mean, images.std,
                              [asdict(s) for s in sets])
    scorer_requests = set(exp.scorer.requests())
    recovery_requests = set(exp.recovery.method.requests())
    if exp.plan.allocation == "sensitivity":
        recovery_requests |= exp.recovery.method.sensitivity_fold().requests()
    groups = [g for g in (scorer_requests, recovery_requests) if g]
    with ctx.stage("collect"):
        stats = cached_stats(model, sets, images, groups, content_key, exp, ctx, f"stats{suffix}")

    def score() -> dict[str, dict]:
        return {name: asdict(o) for name, o in exp.scorer.score(model, sets, stats).items()}

    with ctx.stage("score"):
        orders_key = fingerprint("orders", content_key, sorted(map(repr, scorer_requests)), exp.scorer.name,
                                 exp.scorer.options())
        raw_orders = ctx.cached("orders", orders_key, score, status=f"orders{suffix}")
    return {name: Order(**d) for name, d in raw_orders.items()}, stats, orders_key


def cached_stats(model: nn.Module, sets: list[ChannelSet], images: ImageSet, groups: list[set[StatRequest]],
                 content_key: str, exp: Experiment, ctx: RunContext, status: str) -> dict[str, LayerStats]:
    """Statistics for every request group, one cache entry per group (the scorer's requests; the
    recovery's), so that runs differing only in recovery share the scorer's entry. Whatever groups are
    missing are collected together in one pass over the images."""
    cache = ctx.cache
    layout = [f.name for f in fields(LayerStats)]     # entries stored with another layout are not reused
    keys = {fingerprint("stats", content_key, sorted(map(repr, group)), layout): group for group in groups}
    found: dict[str, dict] = {}

    def collect_missing(key: str) -> dict[str, dict]:
        missing = [k for k in keys if k == key or (k not in found and not cache.contains("stats", k))]
        requests = set().union(*(keys[k] for k in missing))
        raw = {name: asdict(st) for name, st in collect_stats(
            model, sets, images, requests, batch_size=exp.collect.batch_size, device=exp.device,
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
    ctx.cache_status[status] = "none" if not keys else "hit" if all(hits) else "miss"
    return merge_stats(found.values())


def merge_stats(raws: Iterable[dict[str, dict]]) -> dict[str, LayerStats]:
    """One ``LayerStats`` per set from several collections of it (fields filled in any of them)."""
    merged: dict[str, dict] = {}
    for raw in raws:
        for name, entries in raw.items():
            into = merged.setdefault(name, dict(entries))
            for key, value in entries.items():
                if isinstance(value, dict):
                    into[key] = {**into[key], **value}
                elif into[key] is None:
                    into[key] = value
    return {name: LayerStats(**entries) for name, entries in merged.items()}


def has_fold(method: Recovery) -> bool:
    return type(method).fold is not Recovery.fold


def folded(method: Recovery, model: nn.Module, sets: list[ChannelSet], stats: dict[str, LayerStats],
           orders: Orders, keep: Keep, status: dict[str, SetStatus] | None = None) -> nn.Module:
    """A copy of ``model`` with the method's fold applied for ``keep`` (``model`` itself when the method
    has no fold); what the fold did per set goes into ``status``."""
    if not has_fold(method):
        return model
    edited = copy.deepcopy(model)
    done = method.fold(edited, sets, stats, orders, keep)
    if status is not None:
        status.update(done)
    return edited


def plan_stage(model: nn.Module, sets: list[ChannelSet], orders: Orders, stats: dict[str, LayerStats],
               orders_key: str, exp: Experiment, ctx: RunContext, example: torch.Tensor,
               prepared: Any = None) -> dict[str, Any]:
    """Plan stage; returns the plan record (its ``removed`` counts drive the prune stage). A sensitivity
    table is measured with the fold of the run's recovery (``Recovery.sensitivity_fold``) in force, once per
    scores, fold and held-out slice, then cached; MACs searches need no fold. ``prepared``: what the
    protocol measured on the architecture before (``Strategy.prepare``)."""
    plan = exp.plan
    if plan.allocation != "sensitivity":
        return make_keep(orders, sets, plan, model=model, example_input=example, prepared=prepared)[1]
    method = exp.recovery.method.sensitivity_fold()
    if method is not exp.recovery.method:
        log.info("sensitivity: each set pruned alone with recover=%s's fold standing in for recover=%s",
                 method.name, exp.recovery.method.name)

    def prune_fn(keep: Keep) -> nn.Module:
        return apply_keep(folded(method, model, sets, stats, orders, keep), keep, example)

    held_out = sensitivity_images(exp)
    loss_of = divergence_from(model, held_out, device=exp.device)
    # The table depends on the recovery only through the fold in force there.
    fold = (method.name, method.options()) if has_fold(method) else None
    key = fingerprint("sensitivity", orders_key, plan.sensitivity_grid, held_out.images, LOSS, plan.min_channels,
                      plan.round_to, fold)
    sensitivity = ctx.cached("sensitivity", key, lambda: measure_sensitivity(
        sets, orders, plan.sensitivity_grid, prune_fn, loss_of, MacsMeter(model, example), plan.min_channels,
        round_to=plan.round_to, progress=exp.progress))
    log.info("sensitivity (loss increase per ratio):\n%s", format_sensitivity(sensitivity))
    plan_info = make_keep(orders, sets, plan, model=model, example_input=example, loss_of=loss_of,
                          prune_fn=prune_fn, sensitivity=sensitivity, prepared=prepared)[1]
    return {**plan_info, "sensitivity_fold": method.name, "sensitivity_loss": LOSS}


def cached_prune_and_recover(model: nn.Module, sets: list[ChannelSet], orders: Orders,
                             stats: dict[str, LayerStats], orders_key: str, removed: dict[str, int],
                             exp: Experiment, ctx: RunContext, example: torch.Tensor
                             ) -> tuple[nn.Module, dict[str, SetStatus]]:
    """``prune_and_recover``, cached: the pruned model is stored as its checked architecture spec and weights
    (``outputs.save_pruned``'s form), keyed by the scores, the plan, the recovery and the training images."""
    key = fingerprint("recovered", orders_key, removed, exp.plan.scope, exp.recovery.describe(),
                      asdict(exp.collect), exp.train_set.content_key(), exp.seed)

    def compute() -> dict[str, Any]:
        pruned, status = prune_and_recover(model, sets, orders, stats, removed, exp, ctx, example)
        return {"architecture": architecture(pruned), "state_dict": pruned.state_dict(),
                "status": {name: str(done) for name, done in status.items()}}

    entry = ctx.cached("recovered", key, compute)
    pruned = build_model(entry["architecture"], entry["state_dict"])
    pruned.load_state_dict(entry["state_dict"])
    return pruned.to(exp.device).eval(), {name: SetStatus.parse(text) for name, text in entry["status"].items()}


def prune_and_recover(model: nn.Module, sets: list[ChannelSet], orders: Orders, stats: dict[str, LayerStats],
                      removed: dict[str, int], exp: Experiment, ctx: RunContext, example: torch.Tensor
                      ) -> tuple[nn.Module, dict[str, SetStatus]]:
    """Prune stage and recover stage, in ``exp.recovery.iterative_steps`` steps, then distillation and BN
    re-estimation when asked.

    ``removed`` holds the plan's per-set removal counts, reached in equal steps; removed channels never come
    back. Each step folds (before the channels go), removes, and refits against the model it started from
    (on ``calibration_images`` training images drawn with the run's seed); each later step first re-collects
    statistics and re-scores the partly pruned model (cache status ``stats@2``, ...). Returns the pruned
    model and, per set, what the recovery did.
    """
    spec, method = exp.recovery, exp.recovery.method
    sizes = {s.name: s.size for s in sets}
    status: dict[str, SetStatus] = {}
    current = model
    for step in range(1, spec.iterative_steps + 1):
        if step > 1:
            sets = channel_sets(current, example, scope=exp.plan.scope)
            orders, stats, _ = collect_and_score(current, sets, exp, ctx, suffix=f"@{step}")
        target = {name: sizes[name] - round(removed.get(name, 0) * step / spec.iterative_steps) for name in sizes}
        keep = keep_from_counts(orders, sets, {s.name: s.size - target[s.name] for s in sets})
        with ctx.stage("recover"):
            edited = folded(method, current, sets, stats, orders, keep, status)
        with ctx.stage("prune"):
            pruned = apply_keep(edited, keep, example)
        if method.calibration_images:
            with ctx.stage("recover"):
                images = exp.train_set.sample(method.calibration_images, exp.seed)
                status.update(method.refit(current, pruned, sets, keep, images, seed=exp.seed, device=exp.device,
                                           progress=exp.progress))
        current = pruned
    for name, outcome in status.items():
        if not outcome.done:
            log.warning("recovery %s: %s", name, outcome)
    if spec.distill_steps:
        with ctx.stage("distill"):
            # the whole network's repair, recorded beside the per-set statuses under its own key
            status[NETWORK] = SetStatus(True, distill(
                model, current, exp.train_set.sample(spec.distill_images, exp.seed), steps=spec.distill_steps,
                lr=spec.distill_lr, batch_size=spec.distill_batch_size, device=exp.device, seed=exp.seed))
    if spec.bn_images:
        with ctx.stage("recover"):
            recalibrate_bn(current, exp.train_set, spec.bn_images, batch_size=spec.bn_batch_size,
                           device=exp.device, seed=exp.seed)
    return current, status


def evaluate_stage(base: nn.Module, pruned: nn.Module, exp: Experiment, cache: Cache
                   ) -> tuple[Metrics, Metrics, list[PairLatency]]:
    """Evaluate stage: both models' metrics, their latencies timed together per runtime; the accuracy of a
    model already seen on these test images, and the latency of a pair of architectures already timed on
    this machine with the same settings, come from the cache."""
    spec = exp.eval

    def cached_accuracy(model: nn.Module) -> tuple[float, float]:
        def measure() -> list[float]:
            return list(accuracy(model, exp.test_set, device=exp.device, batch_size=spec.batch_size,
                                 progress=exp.progress))

        key = fingerprint("accuracy", model_fingerprint(model), exp.test_set.content_key(), exp.test_set.mean,
                          exp.test_set.std)
        return tuple(cache.get_or_compute("accuracy", key, measure)[0])

    known = (cached_accuracy(base), cached_accuracy(pruned))
    if not spec.latency_batches:
        return (*(evaluate(m, exp.test_set, device=exp.device, latency_batches=(), known_accuracy=acc)
                  for m, acc in zip((base, pruned), known)), [])
    return evaluate_pair(base, pruned, exp.test_set, device=exp.device, latency_batches=spec.latency_batches,
                         latency_repeats=spec.latency_repeats, runtimes=spec.runtimes, batch_size=spec.batch_size,
                         known_accuracy=known, cache=cache)


def check_image_counts(exp: Experiment) -> None:
    """Every option that counts images of a split asks for no more than the split holds: a run never records
    a number of images it did not use (``check_splits`` then keeps the held-out slices apart)."""
    n_train, n_test, name = len(exp.train_set), len(exp.test_set), exp.train_set.name
    counts = {"collect.num_images": exp.collect.num_images, "recover.bn_images": exp.recovery.bn_images,
              "recover.images": exp.recovery.method.calibration_images}
    for key, n in counts.items():
        if n > n_train:
            raise ValueError(f"{key}={n}; accepted: 1 to {n_train} (the training split of dataset={name} holds "
                             f"{n_train} images)")
    if exp.export.onnx and exp.export.check_images > n_test:
        raise ValueError(f"export.check_images={exp.export.check_images}; accepted: 1 to {n_test} (the test split "
                         f"of dataset={name} holds {n_test} images)")


def check_sizes(exp: Experiment, model: nn.Module, example: torch.Tensor) -> None:
    """The image counts (``check_image_counts``), then every batch and every set of images held in memory
    against the memory available (``limits``), before any weights are loaded."""
    check_image_counts(exp)
    why = unwritable(exp.cache_dir, folder=True) if exp.cache_dir is not None else ""
    if why:
        raise ValueError(f"cache.dir={exp.cache_dir}: {why}; accepted: a writable directory")
    available = limits.available_memory(exp.device)
    inference = limits.bytes_per_image(model, example)
    batches = {"eval.batch_size": exp.eval.batch_size, "eval.latency_batches": list(exp.eval.latency_batches),
               "collect.batch_size": exp.collect.batch_size}
    if exp.recovery.bn_images:
        batches["recover.bn_batch_size"] = exp.recovery.bn_batch_size
    if exp.recovery.method.calibration_images:   # held in memory as feature maps, block by block
        batches["recover.images"] = exp.recovery.method.calibration_images
        batches["recover.batch_size"] = getattr(exp.recovery.method, "batch_size", 1)
    limits.check_batches(batches, inference, available)
    training = {"finetune.batch_size": exp.finetune.batch_size} if exp.finetune.epochs > 0 else {}
    if exp.baseline_recipe is not None and not (exp.checkpoint or exp.pretrained):
        training["baseline.recipe.batch_size"] = exp.baseline_recipe.batch_size
    if training:
        limits.check_batches(training, limits.bytes_per_image(model, example, training=True), available)
    limits.check_batches({"collect.num_images": exp.collect.num_images}, example[:1].numel(), available)


def run_stages(exp: Experiment, ctx: RunContext) -> tuple[Results, nn.Module]:
    """Every stage from the baseline to the evaluation; returns the results and the pruned model."""
    example = torch.zeros(1, *input_shape(exp.test_set))
    # The plan needs only the architecture: it is checked before any weights are loaded or trained.
    bare = create_model(exp.model_name, num_classes=exp.train_set.num_classes, **exp.model_kwargs).eval()
    bare_sets = channel_sets(bare, example, scope=exp.plan.scope)
    exp.plan.validate(bare_sets, bare, scorer=exp.scorer, threshold_scorers=threshold_scorers())
    check_sizes(exp, bare, example)
    check_splits(exp)
    with ctx.stage("plan"):
        prepared = exp.plan.strategy.prepare(exp.plan, bare, example, bare_sets, ctx.cached, device=exp.device,
                                             progress=exp.progress)
    with ctx.stage("baseline"):
        model = load_baseline(exp, ctx.cache).to(exp.device).eval()
    example = example.to(exp.device)
    sets = channel_sets(model, example, scope=exp.plan.scope)

    orders, stats, orders_key = collect_and_score(model, sets, exp, ctx)
    with ctx.stage("plan"):
        plan_info = plan_stage(model, sets, orders, stats, orders_key, exp, ctx, example, prepared)
    pruned, recovered = cached_prune_and_recover(model, sets, orders, stats, orders_key, plan_info["removed"], exp,
                                                 ctx, example)

    with ctx.stage("evaluate"):
        base, after_prune, pairs = evaluate_stage(model, pruned, exp, ctx.cache)
        speed = exp.plan.strategy.verify(exp.plan, model, pruned, plan_info, device=exp.device)
    if exp.recovery.label == "none" and exp.finetune.epochs == 0:
        log.warning("top-1 %.2f -> %.2f is the criterion's raw output: nothing repaired the pruned network "
                    "(recover=sequential|blockwise|lstsq repairs it without labels, finetune=short trains it)",
                    base.top1, after_prune.top1)

    final = after_prune
    with ctx.stage("finetune"):
        if exp.finetune.epochs > 0:
            train(pruned, exp.train_set, exp.test_set, exp.finetune, device=exp.device, seed=exp.seed,
                  execution=exp.execution, run_dir=exp.run_dir, resume=exp.resume, progress=exp.progress,
                  on_epoch=None if exp.logger is None else epoch_metrics(exp.logger))
            # Fine-tuning changes weights, not shapes: MACs, params and latency stay those of the pruned model.
            top1, top5 = accuracy(pruned, exp.test_set, device=exp.device, batch_size=exp.eval.batch_size,
                                  progress=exp.progress)
            final = replace(after_prune, top1=top1, top5=top5)

    select = {}
    if exp.eval.select_images:
        with ctx.stage("select"):
            select = fidelity(model, pruned, select_images(exp), device=exp.device)
    pruned_sets = {s.name: s.size for s in channel_sets(pruned, example, scope=exp.plan.scope)}
    kept = {s.name: {"kept": pruned_sets.get(s.name, 0), "total": s.size} for s in sets}
    latency = {f"{p.runtime}/b{p.batch}": p.to_dict() for p in pairs}
    return Results(base, after_prune, final, kept, plan_info, {name: str(done) for name, done in recovered.items()},
                   latency, select, speed), pruned


def epoch_metrics(logger: "Logger") -> Callable[[dict[str, Any]], None]:
    """``train``'s epoch hook: the row's figures as ``finetune/<column>`` at step ``epoch``."""
    def log_epoch(row: dict[str, Any]) -> None:
        logger.log_metrics({f"finetune/{k}": v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    return log_epoch


def run_experiment(exp: Experiment) -> RunRecord:
    """Run every stage and record it in ``exp.run_dir``: ``metrics.json`` (status ``running`` from the
    start), then on success ``metrics.json``, ``results.csv`` and ``pruned_model.pt``, in that order (and
    ``pruned_model.onnx`` when ``exp.export.onnx``). A run directory that holds a finished run is refused
    before any work.

    With ``exp.logger`` (rank 0 only), the run is tracked: the config as parameters at the start, every
    fine-tuning epoch, the final record's numbers, the saved model files as artifacts, and the status it
    ended with, failed or interrupted included."""
    run_dir = Path(exp.run_dir)
    outputs.refuse_finished(run_dir)
    record = RunRecord(exp.settings(), reference=exp.reference, config=exp.config)
    _write_record(run_dir, record)
    logger = exp.logger if distributed.current().is_main else None
    with _failure_recorded(run_dir, record):
        if exp.resume and exp.finetune.epochs > 0:
            check_resumable(run_dir, exp.finetune, exp.seed)
        if logger is not None:
            logger.start(exp.run_name or run_dir.name, exp.config or exp.settings().to_dict())
    if logger is None:
        return _run_and_record(exp, record, None)
    with logger:          # closes the run with the status the block ends with
        return _run_and_record(exp, record, logger)


@contextlib.contextmanager
def _failure_recorded(run_dir: Path, record: RunRecord, ctx: "RunContext | None" = None) -> Iterator[None]:
    """Whatever the block raises is recorded as the run's failure (with the stage timings so far), then
    re-raised."""
    try:
        yield
    except BaseException as err:
        record.status, record.error = FAILED, error_text(err)
        if ctx is not None:
            record.timings_s, record.cache = _rounded(ctx.timings), ctx.cache_status
        _write_record(run_dir, record)
        raise


def _run_and_record(exp: Experiment, record: RunRecord, logger: "Logger | None") -> RunRecord:
    started = time.perf_counter()
    run_dir = Path(exp.run_dir)
    torch.manual_seed(exp.seed)
    ctx = RunContext(Cache(exp.cache_dir or run_dir / "cache", enabled=exp.cache_dir is not None))
    with _failure_recorded(run_dir, record, ctx):
        record.results, pruned = run_stages(exp, ctx)
    record.status = OK
    record.timings_s = _rounded({**ctx.timings, "total": time.perf_counter() - started})
    record.cache = ctx.cache_status
    _write_record(run_dir, record)
    is_main = distributed.current().is_main
    if exp.save_model and is_main:
        outputs.save_pruned(run_dir / outputs.PRUNED_FILE, pruned.cpu())
    if (exp.export.onnx or exp.export.quantize) and is_main:
        with ctx.stage("export"):
            record.export = export_stage(pruned.cpu(), exp)
        record.timings_s["export"] = round(ctx.timings["export"], 3)
        _write_record(run_dir, record)
    if logger is not None:
        logger.log_record({k: v for k, v in record.to_dict().items() if k != "config"})
        files = ([outputs.PRUNED_FILE] * exp.save_model + [ONNX_FILE] * bool(exp.export.onnx or exp.export.quantize)
                 + [INT8_FILE] * bool(exp.export.quantize))
        for path in (run_dir / name for name in files):
            if path.is_file():
                logger.log_artifact(path)
    return record


def export_stage(pruned: nn.Module, exp: Experiment) -> dict[str, Any]:
    """Export stage: ``pruned_model.onnx`` in the run directory, checked in ONNX Runtime against PyTorch on
    the first test images. A failure is returned as the record's ``error``, not raised: the run's results
    stand without the file."""
    path = Path(exp.run_dir) / ONNX_FILE
    try:
        images, _ = next(iter(make_loader(exp.test_set, exp.export.check_images, device="cpu", train=False,
                                          num_workers=0)))
        export_onnx(pruned, path, images[:1])
        check = check_onnx(pruned, path, images)
    except Exception as err:
        log.warning("ONNX export failed: %s", error_text(err))
        return {"onnx_file": str(path), "ok": False, "error": error_text(err)}
    if not check["ok"]:
        log.warning("ONNX Runtime disagrees with PyTorch: relative error %.3g above %g", check["rel_error"],
                    check["tolerance"])
    if exp.export.quantize:
        check["int8"] = int8_stage(path, exp)
    return check


def int8_stage(fp32: Path, exp: Experiment) -> dict[str, Any]:
    """``pruned_model.int8.onnx``: ONNX Runtime's static quantization of the exported file, calibrated on the
    run's unlabeled training images (the statistics' sample); its top-1 and size beside the fp32 file's, and
    both timed together in ONNX Runtime at the plan's latency batch and threads. A failure is recorded as
    the entry's ``error``."""
    out = Path(exp.run_dir) / INT8_FILE
    try:
        images = exp.train_set.sample(exp.export.calibration_images, exp.seed)
        calibration = (x for x, _ in make_loader(images, 64, device="cpu", train=False, num_workers=0))
        quantize_int8(fp32, out, calibration)

        def test_batches():
            return make_loader(exp.test_set, exp.eval.batch_size, device="cpu", train=False, num_workers=0)

        plan = exp.plan
        pair = onnx_pair_latency(fp32, out, plan.latency_batch, input_shape=input_shape(exp.test_set),
                                 threads=plan.latency_threads, repeats=max(plan.latency_repeats, 10))
        result = {"int8_file": str(out), "ok": True, "fp32_top1": onnx_accuracy(fp32, test_batches()),
                  "int8_top1": onnx_accuracy(out, test_batches()), "fp32_bytes": fp32.stat().st_size,
                  "int8_bytes": out.stat().st_size, "latency": pair.to_dict()}
    except Exception as err:
        log.warning("int8 quantization failed: %s", error_text(err))
        return {"int8_file": str(out), "ok": False, "error": error_text(err)}
    log.info("int8 (ONNX Runtime static quantization): top-1 %.2f (fp32 %.2f), %.2f MB (fp32 %.2f), speed-up over "
             "fp32 %s at batch %d", result["int8_top1"], result["fp32_top1"], result["int8_bytes"] / 1e6,
             result["fp32_bytes"] / 1e6, pair.speedup_text(), pair.batch)
    return result


def _write_record(run_dir: Path, record: RunRecord) -> None:
    """Under torchrun every rank runs the stages; only rank 0 writes the run's files."""
    if distributed.current().is_main:
        outputs.write_record(run_dir, record)


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(seconds, 3) for stage, seconds in timings.items()}
