"""One pruning experiment as plain stages: baseline -> collect -> score -> plan -> prune -> recover ->
fine-tune -> evaluate, recorded in a ``RunRecord``. Nothing here reads a config object: ``qsfm_cli.app``
translates the config into an ``Experiment`` and calls ``run_experiment``; Python users can do the same
without Hydra.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from . import distributed, limits, outputs
from .baseline import load_baseline
from .cache import Cache, RunContext, fingerprint
from .collect import CollectSpec, collect_stage, content_key
from .data import ImageSet
from .deploy import export_stage
from .evaluate import EvalSpec, evaluate_stage, fidelity
from .export import INT8_FILE, ONNX_FILE, ExportSpec
from .files import unwritable
from .loaders import input_shape
from .models import create_model
from .plan import PlanSpec, plan_stage
from .pruning import channel_sets
from .record import FAILED, OK, Results, RunRecord, Settings, error_text
from .recover import RecoverySpec, cached_prune_and_recover
from .scoring import Scorer, score_stage, threshold_scorers
from .train import Execution, TrainRecipe, check_resumable, finetune
from .types import ChannelSet, LayerStats, Orders

if TYPE_CHECKING:
    from .loggers import Logger

log = logging.getLogger(__name__)

SEED_LIMIT = 2 ** 63   # torch's generators take any seed below this


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
    last = {"prune.sensitivity_images": exp.plan.sensitivity_images if exp.plan.needs_sensitivity
            or exp.eval.select_images else 0, "eval.select_images": exp.eval.select_images}
    if not any(last.values()):
        return
    used = max(first.values()) + sum(last.values())
    if used > len(exp.train_set):
        parts = ", ".join(f"{k}={v}" for k, v in {**first, **last}.items() if v)
        raise ValueError(f"{parts}: {used} training images, this training set has {len(exp.train_set)}; the "
                         f"sensitivity and selection images must be apart from the others: lower them")


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


def _collect_and_score(model: nn.Module, sets: list[ChannelSet], exp: Experiment, ctx: RunContext,
                       suffix: str = "") -> tuple[Orders, dict[str, LayerStats], str]:
    """Collect stage (the scorer's statistics and the recovery's, each group cached apart) then score
    stage; returns the orders, the statistics and the orders' cache key. ``suffix`` tells apart the cache
    status of a later iterative step ("@2")."""
    images = exp.train_set.sample(exp.collect.num_images, exp.seed)
    key = content_key(model, sets, images)
    groups = [set(exp.scorer.requests()), exp.recovery.method.requests_with(exp.plan.needs_sensitivity)]
    with ctx.stage("collect"):
        stats = collect_stage(model, sets, images, groups, exp.collect, ctx, key=key, status=f"stats{suffix}",
                              device=exp.device, progress=exp.progress)
    with ctx.stage("score"):
        orders, orders_key = score_stage(model, sets, stats, exp.scorer, ctx, key=key, status=f"orders{suffix}")
    return orders, stats, orders_key


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
        model = load_baseline(exp.model_name, exp.train_set, exp.test_set, model_kwargs=exp.model_kwargs,
                              checkpoint=exp.checkpoint, pretrained=exp.pretrained, allow_pickle=exp.allow_pickle,
                              recipe=exp.baseline_recipe, seed=exp.seed, device=exp.device,
                              cache_dir=ctx.cache.root, execution=exp.execution, progress=exp.progress)
        model = model.to(exp.device).eval()
    example = example.to(exp.device)
    sets = channel_sets(model, example, scope=exp.plan.scope)

    orders, stats, orders_key = _collect_and_score(model, sets, exp, ctx)
    with ctx.stage("plan"):
        plan_info = plan_stage(model, sets, orders, stats, exp.plan, exp.recovery.method, ctx, example,
                               orders_key=orders_key, held_out=lambda: sensitivity_images(exp), prepared=prepared,
                               device=exp.device, progress=exp.progress)

    def rescore(current: nn.Module, suffix: str) -> tuple[list[ChannelSet], Orders, dict[str, LayerStats]]:
        current_sets = channel_sets(current, example, scope=exp.plan.scope)
        return (current_sets, *_collect_and_score(current, current_sets, exp, ctx, suffix=suffix)[:2])

    pruned, recovered = cached_prune_and_recover(
        model, sets, orders, stats, plan_info["removed"], exp.recovery, exp.train_set, ctx, example,
        key=fingerprint(orders_key, asdict(exp.collect)), rescore=rescore, seed=exp.seed, device=exp.device,
        progress=exp.progress)

    with ctx.stage("evaluate"):
        base, after_prune, pairs = evaluate_stage(model, pruned, exp.test_set, exp.eval, ctx.cache,
                                                  device=exp.device, progress=exp.progress)
        speed = exp.plan.strategy.verify(exp.plan, model, pruned, plan_info, device=exp.device)
    if exp.recovery.is_raw and exp.finetune.epochs == 0:
        log.warning("top-1 %.2f -> %.2f is the criterion's raw output: nothing repaired the pruned network "
                    "(recover=sequential|blockwise|lstsq repairs it without labels, finetune=short trains it)",
                    base.top1, after_prune.top1)

    with ctx.stage("finetune"):
        final = finetune(pruned, after_prune, exp.finetune, exp.train_set, exp.test_set, seed=exp.seed,
                         device=exp.device, execution=exp.execution, run_dir=exp.run_dir, resume=exp.resume,
                         progress=exp.progress, batch_size=exp.eval.batch_size,
                         on_epoch=None if exp.logger is None else epoch_metrics(exp.logger))

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
            plan = exp.plan
            record.export = export_stage(pruned.cpu(), exp.export, run_dir, exp.test_set, train_set=exp.train_set,
                                         seed=exp.seed, batch_size=exp.eval.batch_size,
                                         latency_batch=plan.latency_batch, latency_threads=plan.latency_threads,
                                         latency_repeats=plan.latency_repeats)
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


def _write_record(run_dir: Path, record: RunRecord) -> None:
    """Under torchrun every rank runs the stages; only rank 0 writes the run's files."""
    if distributed.current().is_main:
        outputs.write_record(run_dir, record)


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(seconds, 3) for stage, seconds in timings.items()}
