"""One training loop for fine-tuning pruned models and for training baselines from scratch.

SGD (momentum, optional Nesterov, weight decay), cross-entropy with optional label smoothing, a per-step
schedule (``step`` milestones or ``cosine``, both with optional linear warm-up), mixed precision,
channels_last and the device-resident data path. Long runs are safe: a checkpoint is written atomically
after every epoch (and on Ctrl-C, SIGTERM or submitit's pre-emption signal, mid-epoch; submitit then requeues
the job), ``resume=True`` continues bit-for-bit where the run stopped (data order and augmentation are
functions of ``(seed, epoch)``, RNG states are saved), and a NaN/inf loss stops the run without touching the
last good checkpoint.

Under a multi-process launcher (torchrun, or Hydra's submitit launcher on SLURM; see
``qsfm_cli.distributed``) the same loop trains data-parallel: each rank reads its share of every global
batch of ``batch_size`` images, gradients are averaged by DistributedDataParallel, epoch metrics and test
accuracy are summed over the ranks, and only rank 0 writes the checkpoint and the log. BatchNorm
statistics are per rank, as in torchvision's ImageNet recipe.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import pickle
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .cache import model_fingerprint
from .data import ImageSet
from .evaluate import accuracy
from .files import atomic_write
from .loaders import PATHS, DeviceLoader, TorchvisionLoader, make_loader
from .record import Metrics

if TYPE_CHECKING:
    from .imagefolder import FolderSet

log = logging.getLogger(__name__)

SCHEDULES = ("step", "cosine")
AMP_MODES = ("auto", "bf16", "fp16", "none")
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.csv"
LOG_COLUMNS = ("epoch", "lr", "loss", "train_top1", "test_top1", "seconds")
_SYNC_EVERY = 25   # steps between host syncs (progress bar, NaN check, ranks agreeing to stop): no per-step stall


@dataclass
class TrainRecipe:
    """How to train: the fields that determine the trained weights (``conf/finetune/*.yaml``).

    ``milestones`` (``schedule=step``): a value below 1 is a fraction of the run (``0.5`` = half-way, so an
    ``epochs`` override keeps the shape), a value of 1 or more an epoch number (the lr drops when that
    epoch, counted from 0 as in ``MultiStepLR``, begins); the lr is multiplied by ``gamma`` at each.
    ``warmup_epochs`` ramps the lr linearly from ~0 over that many epochs, per step, for either schedule.
    How fast the training runs is ``Execution``'s business, not the recipe's.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)   # also turns an OmegaConf ListConfig into a tuple
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; accepted: >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}; accepted: >= 1")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)}; accepted: a finite number")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; accepted: > 0")
        if self.nesterov and self.momentum <= 0:
            raise ValueError(f"momentum={self.momentum}; accepted with nesterov=true: > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing}; accepted: a number in [0, 1)")
        for m in self.milestones:
            if m <= 0 or (m >= 1 and m != int(m)):
                raise ValueError(f"milestones={list(self.milestones)}; accepted: fractions in (0, 1) or whole "
                                 f"epoch numbers >= 1")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "TrainRecipe":
        """Like ``TrainRecipe(**cfg)``, with a one-line error naming an unknown key."""
        return cls(**_known_keys(cls, cfg))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; what a baseline cache key or a resume must match."""
        return {**asdict(self), "milestones": list(self.milestones)}

    def milestone_steps(self, steps_per_epoch: int) -> list[int]:
        """Optimizer steps at which the lr drops: a fraction of the whole run, or an epoch's first step."""
        total = self.epochs * steps_per_epoch
        return sorted(round(m * total) if m < 1 else int(m) * steps_per_epoch for m in self.milestones)


@dataclass
class Execution:
    """How fast a training runs, never what it computes beyond floating-point detail (the ``execution``
    config node): left out of cache keys and of the resume check.

    ``amp``: ``auto`` is bf16 on CUDA when supported, else fp16 (with loss scaling), and fp32 on the CPU.
    ``channels_last`` puts the model and the batches in that memory format (faster convolutions on tensor
    cores, and with oneDNN on the CPU). ``eval_every``: test accuracy every N epochs and always after the
    last (0: only after the last). ``data_path``: ``device`` keeps the uint8 data on the device,
    ``torchvision`` uses a DataLoader with ``num_workers`` PIL workers, ``auto`` picks ``device`` when the
    data fits. ``deterministic`` asks cuDNN/CUDA for deterministic kernels, so GPU reruns and resumes repeat
    exactly (CPU runs do anyway); ``false`` lets cuDNN autotune for speed.
    """

    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    eval_every: int = 1
    data_path: str = "auto"
    num_workers: int = 4
    deterministic: bool = True

    def __post_init__(self) -> None:
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("data_path", self.data_path, PATHS)
        for name in ("eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; accepted: >= 0")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "Execution":
        return cls(**_known_keys(cls, cfg))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _known_keys(cls: type, cfg: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}={cfg[unknown[0]]}; accepted: {', '.join(sorted(known))}")
    return dict(cfg)


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value}; accepted: {', '.join(accepted)}")


@dataclass
class TrainResult:
    """``history``: one row per epoch (the columns of ``train_log.csv``), including epochs run before a
    resume; ``test_top1``: test accuracy (percent) after the last epoch, ``None`` without a test set;
    ``epochs_run``: epochs trained by this call."""

    history: list[dict[str, Any]] = field(default_factory=list)
    test_top1: float | None = None
    epochs_run: int = 0


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def lr_factor(recipe: TrainRecipe, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of ``recipe.lr`` at optimizer step ``step`` (0-based), for ``LambdaLR``."""
    total = recipe.epochs * steps_per_epoch
    warmup = min(recipe.warmup_epochs * steps_per_epoch, total)
    milestones = recipe.milestone_steps(steps_per_epoch)

    def factor(step: int) -> float:
        ramp = (step + 1) / warmup if step < warmup else 1.0
        if recipe.schedule == "cosine":
            if step < warmup:
                return ramp
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return ramp * recipe.gamma ** sum(step >= m for m in milestones)

    return factor


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``; ``None`` means fp32."""
    _check_choice("amp", amp, AMP_MODES)
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def _correct(model: nn.Module, loader: DeviceLoader | TorchvisionLoader, device: torch.device,
             dtype: torch.dtype | None) -> torch.Tensor:
    """Number of correctly classified images of ``loader``'s epoch 0, on ``device``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for x, y in loader.iter_epoch(0):
        with _autocast(device, dtype):
            correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    return correct


def train(model: nn.Module, train_set: ImageSet | FolderSet, test_set: ImageSet | FolderSet | None,
          recipe: TrainRecipe, *, device: str | torch.device, seed: int, execution: Execution | None = None,
          run_dir: Path | None = None, resume: bool = False, progress: bool = True,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` in place following ``recipe``, run as ``execution`` says (default ``Execution()``);
    see the module docstring for checkpoints.

    With ``run_dir``, ``run_dir/train_state.pt`` (loadable with ``torch.load(weights_only=True)``) is
    rewritten after every epoch and ``run_dir/train_log.csv`` gets one row per epoch. ``resume=True``
    continues from that checkpoint (a finished run just loads its weights). Ctrl-C or SIGTERM finishes the
    current step (data-parallel: the ranks stop together, within ``_SYNC_EVERY`` steps), saves a checkpoint
    and raises ``KeyboardInterrupt``; a second signal stops at once. A NaN/inf loss raises
    ``NonFiniteLossError`` naming the epoch and step; the in-memory weights are then those of the failing
    step, the checkpoint those of the last good epoch. Under a multi-process launcher every rank calls
    this with the same arguments and the same run directory. ``on_epoch`` (an experiment logger's hook) gets
    each epoch's row on rank 0, once the row is in ``train_log.csv``.
    """
    if recipe.epochs == 0:
        return TrainResult()
    ctx = distributed.init()
    device = distributed.rank_device(device, ctx)
    execution = execution or Execution()
    run_dir = Path(run_dir) if run_dir is not None else None
    with torch.random.fork_rng(devices=_cuda_devices(device)), _determinism(execution.deterministic, device), \
            _stop_flag() as interrupted:
        # Every rank seeds alike, so rank 0's saved RNG state resumes every rank.
        torch.manual_seed(seed)
        trainer = _Trainer(model, train_set, test_set, recipe, execution, device=device, seed=seed,
                           run_dir=run_dir, progress=progress, ctx=ctx)
        try:
            return trainer.run(resume=resume, interrupted=interrupted, on_epoch=on_epoch)
        finally:
            model.to(memory_format=torch.contiguous_format)


@dataclass
class _EpochSums:
    """Running totals of one epoch, kept on the device so that no step waits for the host."""

    loss: torch.Tensor
    correct: torch.Tensor
    first_bad: torch.Tensor      # first step whose loss was not finite, -1 if none
    seen: int = 0
    lr: float = 0.0
    seconds: float = 0.0

    @classmethod
    def zeros(cls, device: torch.device, lr: float) -> "_EpochSums":
        return cls(torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.long, device=device),
                   torch.full((), -1, dtype=torch.long, device=device), lr=lr)

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss.cpu(), "correct": self.correct.cpu(), "seen": self.seen, "lr": self.lr,
                "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device) -> "_EpochSums":
        return cls(state["loss"].to(device), state["correct"].to(device),
                   torch.full((), -1, dtype=torch.long, device=device), state["seen"], state["lr"],
                   state["seconds"])


class _Trainer:
    def __init__(self, model: nn.Module, train_set: ImageSet | FolderSet, test_set: ImageSet | FolderSet | None,
                 recipe: TrainRecipe, execution: Execution, *, device: torch.device, seed: int,
                 run_dir: Path | None, progress: bool, ctx: distributed.Context):
        self.model, self.recipe, self.execution, self.ctx = model, recipe, execution, ctx
        self.device, self.seed, self.run_dir = device, seed, run_dir
        self.progress = progress and ctx.is_main
        # What the run started from: a resume must continue the same (pruned) model, not another one.
        self.start_key = model_fingerprint(model)
        self.amp = resolve_amp(execution.amp, device)
        self.channels_last = execution.channels_last
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # A last batch of one image would break BatchNorm; drop the remainder unless it is everything.
        drop_last = len(train_set) >= recipe.batch_size
        if ctx.active and not drop_last:
            raise ValueError(f"data-parallel training needs at least one full batch: {len(train_set)} training "
                             f"images, batch_size={recipe.batch_size}")
        shard = (ctx.rank, ctx.world)
        self.loader: DeviceLoader | TorchvisionLoader = make_loader(
            train_set, recipe.batch_size, device=device, train=True, seed=seed, drop_last=drop_last,
            path=execution.data_path, num_workers=execution.num_workers, channels_last=self.channels_last,
            shard=shard)
        self.steps = len(self.loader)
        self.test_loader = None if test_set is None else make_loader(
            test_set, 512, device=device, train=False, path=execution.data_path,
            num_workers=execution.num_workers, channels_last=self.channels_last, shard=shard)
        self.test_images = 0 if test_set is None else len(test_set)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                         nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(recipe, self.steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        wrapped = distributed.wrap(model, device, ctx)
        self.net = torch.compile(wrapped) if execution.compile else wrapped
        # Ranks evaluate different images, and a DDP forward is a collective: test with the bare model.
        self.eval_net = model if ctx.active else self.net
        self.history: list[dict[str, Any]] = []
        if recipe.warmup_epochs > recipe.epochs:
            log.warning("warmup_epochs=%d exceeds epochs=%d: the whole run is warm-up",
                        recipe.warmup_epochs, recipe.epochs)

    @property
    def state_path(self) -> Path | None:
        return self.run_dir / STATE_FILE if self.run_dir is not None else None

    def run(self, *, resume: bool, interrupted: threading.Event,
            on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        start_epoch, step, sums = 0, 0, None
        if resume:
            start_epoch, step, sums = self._load()
        for epoch in range(start_epoch, self.recipe.epochs):
            sums = self._train_epoch(epoch, step, sums, interrupted)
            step = 0
            row = self._finish_epoch(epoch, sums)
            self.history.append(row)
            self._save(epoch + 1, 0, None)
            self._write_log()
            if self.ctx.is_main and on_epoch is not None:
                on_epoch(dict(row))
            if self.ctx.is_main:
                log.info("epoch %d/%d  lr %.4g  loss %.4f  train top-1 %.2f%%  test top-1 %s  (%.1f s)",
                         epoch + 1, self.recipe.epochs, row["lr"], row["loss"], row["train_top1"],
                         "-" if row["test_top1"] is None else f"{row['test_top1']:.2f}%", row["seconds"])
            sums = None
            if self._stop_requested(interrupted):
                self._raise_interrupt(epoch + 1, 0)
        final = self.history[-1]["test_top1"] if self.history else None
        if final is None and self.test_loader is not None:
            final = self._evaluate()
        return TrainResult(list(self.history), final, self.recipe.epochs - start_epoch)

    def _train_epoch(self, epoch: int, start_step: int, sums: _EpochSums | None,
                     interrupted: threading.Event) -> _EpochSums:
        self.model.train()
        sums = sums or _EpochSums.zeros(self.device, self.optimizer.param_groups[0]["lr"])
        started = time.perf_counter() - sums.seconds
        bar = tqdm(total=self.steps, initial=start_step, desc=f"epoch {epoch + 1}/{self.recipe.epochs}",
                   leave=False, disable=not self.progress, dynamic_ncols=True)
        with bar:
            for step, (x, y) in enumerate(self.loader.iter_epoch(epoch, start_step), start=start_step):
                self._step(x, y, step, sums)
                done = step + 1
                # Ranks meet only at fixed steps (a collective that some ranks skip would hang); one
                # process stops at the first step after a signal.
                if done % _SYNC_EVERY == 0 or done == self.steps or (not self.ctx.active and interrupted.is_set()):
                    stop = self._stop_requested(interrupted)
                    self._check_finite(sums, epoch)
                    bar.update(done - bar.n)
                    bar.set_postfix(loss=f"{sums.loss.item() / sums.seen:.4f}",
                                    acc=f"{100.0 * sums.correct.item() / sums.seen:.2f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.4g}")
                    if stop:
                        sums.seconds = time.perf_counter() - started
                        self._save(epoch, done, sums)
                        self._raise_interrupt(epoch, done)
        sums.seconds = time.perf_counter() - started
        return sums

    def _step(self, x: torch.Tensor, y: torch.Tensor, step: int, sums: _EpochSums) -> None:
        with _autocast(self.device, self.amp):
            logits = self.net(x)
            loss = self.criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        loss = loss.detach().float()
        sums.first_bad.masked_fill_(~torch.isfinite(loss) & (sums.first_bad < 0), step)
        sums.loss += loss.double() * len(y)
        sums.correct += (logits.detach().argmax(1) == y).sum()
        sums.seen += len(y)

    def _stop_requested(self, interrupted: threading.Event) -> bool:
        """Whether any rank was signalled (a collective under DDP: every rank must call it)."""
        flag = torch.tensor([float(interrupted.is_set())], device=self.device)
        return bool(distributed.reduce_(flag, "max").item())

    def _check_finite(self, sums: _EpochSums, epoch: int) -> None:
        # The earliest non-finite step of any rank (a collective under DDP), so that every rank stops.
        never = torch.iinfo(torch.long).max
        first = torch.where(sums.first_bad < 0, never, sums.first_bad)
        bad = int(distributed.reduce_(first, "min").item())
        if bad == never:
            return
        kept = (f"the last good checkpoint {self.state_path} is unchanged" if self.state_path is not None
                and self.state_path.is_file() else "no checkpoint was written")
        raise NonFiniteLossError(
            f"loss became NaN/inf at epoch {epoch + 1}/{self.recipe.epochs}, step {bad + 1}/{self.steps} "
            f"(lr {self.recipe.lr:g}, amp {self.execution.amp}); training stopped and {kept}. Lower the learning "
            f"rate, or try amp=bf16/none")

    def _finish_epoch(self, epoch: int, sums: _EpochSums) -> dict[str, Any]:
        started = time.perf_counter()
        last = epoch + 1 == self.recipe.epochs
        every = self.execution.eval_every
        test = None
        if self.test_loader is not None and (last or (every and (epoch + 1) % every == 0)):
            test = self._evaluate()
        loss, correct, seen = self._totals(sums).tolist()
        return {"epoch": epoch + 1, "lr": sums.lr, "loss": loss / max(1, seen),
                "train_top1": 100.0 * correct / max(1, seen), "test_top1": test,
                "seconds": sums.seconds + time.perf_counter() - started}

    def _totals(self, sums: _EpochSums) -> torch.Tensor:
        """``[loss sum, correct, images]`` of the epoch so far, summed over the ranks (float64)."""
        totals = torch.stack([sums.loss, sums.correct.double(),
                              torch.tensor(float(sums.seen), dtype=torch.float64, device=self.device)])
        return distributed.reduce_(totals)

    def _evaluate(self) -> float:
        assert self.test_loader is not None
        correct = distributed.reduce_(_correct(self.eval_net, self.test_loader, self.device, self.amp))
        return 100.0 * correct.item() / self.test_images

    def _raise_interrupt(self, epoch: int, step: int) -> None:
        where = f"epoch {epoch + 1}, step {step}/{self.steps}" if step else f"the end of epoch {epoch}"
        if self.state_path is None:
            msg = f"training interrupted at {where}; no run_dir, so nothing was saved"
        else:
            msg = (f"training interrupted at {where}; checkpoint saved to {self.state_path}: rerun with "
                   f"resume=true to continue")
        if self.ctx.is_main:
            log.warning(msg)
        raise KeyboardInterrupt(msg)

    def _save(self, epoch: int, step: int, sums: _EpochSums | None) -> None:
        """Rank 0 writes the checkpoint; under DDP every rank calls this at the same step and waits for it,
        so no rank exits (and has the launcher stop the others) before the file is complete."""
        if self.state_path is None:
            return
        partial = None
        if sums is not None:
            partial = sums.state()
            loss, correct, seen = self._totals(sums)
            partial.update(loss=loss.cpu(), correct=correct.long().cpu(), seen=int(seen))
        if self.ctx.is_main:
            self._write_state(epoch, step, partial)
        distributed.barrier()

    def _write_state(self, epoch: int, step: int, partial: dict[str, Any] | None) -> None:
        state = {
            "epoch": epoch, "step": step, "partial": partial,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "history": self.history, "recipe": self.recipe.to_dict(), "seed": self.seed,
            "start": self.start_key,
        }
        atomic_write(self.state_path, lambda f: torch.save(state, f))

    def _load(self) -> tuple[int, int, _EpochSums | None]:
        path = self.state_path
        if path is None or not path.is_file():
            log.info("resume: no checkpoint %s, starting from scratch", path)
            return 0, 0, None
        state = read_state(path)
        self._check_compatible(state, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.history = list(state["history"])
        self._write_log()
        epoch, step = state["epoch"], state["step"]
        if self.ctx.is_main:
            log.info("resume: continuing from %s at epoch %d, step %d", path, epoch + 1 if step else epoch, step)
        sums = None
        if state["partial"] is not None:
            sums = _EpochSums.from_state(state["partial"], self.device)
            if not self.ctx.is_main:   # the saved sums are every rank's together: rank 0 carries them
                sums = replace(_EpochSums.zeros(self.device, sums.lr), seconds=sums.seconds)
        return epoch, step, sums

    def _check_compatible(self, state: Mapping[str, Any], path: Path) -> None:
        if state.get("start") != self.start_key:
            raise ValueError(f"cannot resume from {path}: it was written for a different model (other weights, "
                             f"channels or scorer); use another run directory, or set resume=false to start over")
        _check_recipe(state, path, self.recipe, self.seed)

    def _write_log(self) -> None:
        if self.run_dir is not None and self.ctx.is_main:
            atomic_write(self.run_dir / LOG_FILE, lambda f: f.write(_csv_text(self.history).encode()))


def finetune(pruned: nn.Module, after_prune: Metrics, recipe: TrainRecipe, train_set: ImageSet | FolderSet,
             test_set: ImageSet | FolderSet, *, seed: int, device: str | torch.device = "cpu",
             execution: Execution | None = None, run_dir: Path | None = None, resume: bool = False,
             progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
             batch_size: int = 500) -> Metrics:
    """Fine-tune stage: ``pruned`` trained in place with ``recipe`` (nothing when it has no epochs); returns
    ``after_prune`` with the accuracy measured after training on ``test_set`` in batches of ``batch_size``.
    Fine-tuning changes weights, not shapes: MACs, params and latency stay those of the pruned model."""
    if recipe.epochs == 0:
        return after_prune
    train(pruned, train_set, test_set, recipe, device=device, seed=seed, execution=execution, run_dir=run_dir,
          resume=resume, progress=progress, on_epoch=on_epoch)
    top1, top5 = accuracy(pruned, test_set, device=device, batch_size=batch_size, progress=progress)
    return replace(after_prune, top1=top1, top5=top5)


def check_resumable(run_dir: Path, recipe: TrainRecipe, seed: int) -> None:
    """Refuse, before any pipeline work, a resume whose saved fine-tuning state in ``run_dir`` was written
    with another recipe or seed (whether it continues the same pruned model is known only once it exists)."""
    path = Path(run_dir) / STATE_FILE
    if path.is_file():
        _check_recipe(read_state(path), path, recipe, seed)


def read_state(path: Path) -> dict[str, Any]:
    """A fine-tuning state saved by ``train``; one ``ValueError`` line naming the file and what to do when
    it cannot be read (torch's own text would advise unpickling code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        why = "it pickles objects other than tensors" if isinstance(err, pickle.UnpicklingError) \
            else "truncated or corrupt"
        raise ValueError(f"cannot resume from {path}: not a fine-tuning state of qsfm-run ({why}); delete it, "
                         f"or set resume=false to start over") from None
    if not isinstance(state, dict) or not {"recipe", "seed"} <= state.keys():
        raise ValueError(f"cannot resume from {path}: not a fine-tuning state of qsfm-run (no recipe and seed); "
                         f"delete it, or set resume=false to start over")
    return state


def _check_recipe(state: Mapping[str, Any], path: Path, recipe: TrainRecipe, seed: int) -> None:
    ours, theirs = recipe.to_dict(), state["recipe"]
    changed = [f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(ours.keys() | theirs.keys())
               if ours.get(k) != theirs.get(k)]
    if state["seed"] != seed:
        changed.append(f"seed: {state['seed']} -> {seed}")
    if changed:
        raise ValueError(f"cannot resume from {path}: it was written with a different recipe "
                         f"({', '.join(changed)}); restore those values, or set resume=false to start over")


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in LOG_COLUMNS})
    return buf.getvalue()


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic cuDNN/CUDA kernels (or cuDNN autotuning when disabled) for the run only."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def _preempt_signal() -> signal.Signals | None:
    """The signal a job manager sends before it pre-empts or times out a job and whose handler requeues
    it: submitit's (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default), when it is set up in this process."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if sig is None or not callable(signal.getsignal(sig)):
        return None
    return sig


@contextlib.contextmanager
def _stop_flag() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C or SIGTERM (what SLURM and torchrun send before killing a job) into a flag the
    loop checks between steps, so a checkpoint is never taken half-way through an optimizer step; a second
    signal interrupts at once. A job manager's pre-emption signal (submitit's) stops the loop the same way
    and is then handed to the manager's own handler, which requeues the job once the checkpoint is saved."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    preempted: list[int] = []

    def handler(signum, frame) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        if signum == preempt:
            preempted.append(signum)
        log.warning("%s: stopping after this step and saving a checkpoint (send it again to abort now)",
                    "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)

    preempt = _preempt_signal()
    signals = (signal.SIGINT, signal.SIGTERM) + ((preempt,) if preempt is not None else ())
    previous = [signal.signal(s, handler) for s in signals]
    try:
        yield flag
    finally:
        for s, handler_before in zip(signals, previous):
            signal.signal(s, handler_before)
        if preempted:
            signal.getsignal(preempted[0])(preempted[0], None)
