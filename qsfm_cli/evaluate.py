"""Evaluation stage: accuracy, MACs and parameters counted as the papers do (``qsfm_cli.counting``), and
latency; the label-free divergence the planner is given to measure pruned copies; a model's fidelity to
the original on held-out training images (what recipes are chosen by)."""
from __future__ import annotations

import logging
import math
import os
import platform
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .cache import Cache, fingerprint, model_fingerprint
from .counting import count_macs, count_params
from .data import ImageSet
from .latency import MIN_REPEATS, RUNTIMES, PairLatency, measure_pair, model_latency
from .loaders import input_shape, make_loader
from .record import Metrics

if TYPE_CHECKING:
    from .imagefolder import FolderSet

log = logging.getLogger(__name__)

@torch.no_grad()
def accuracy(model: nn.Module, ds: ImageSet | FolderSet, *, device: str | torch.device = "cpu",
             batch_size: int = 500, progress: bool = False) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent on every image of ``ds`` (a progress bar with ``progress``)."""
    model.eval()
    hits1 = hits5 = 0
    log.info("accuracy on %d images of %s", len(ds), ds.name or "the test split")
    batches = make_loader(ds, batch_size, device=device, train=False, path="device")
    for x, y in tqdm(batches, desc="evaluate", total=math.ceil(len(ds) / batch_size), unit="batch",
                     disable=not progress, leave=False):
        top = model(x).topk(min(5, ds.num_classes), dim=1).indices
        hits1 += (top[:, 0] == y).sum().item()
        hits5 += (top == y[:, None]).any(dim=1).sum().item()
    return 100.0 * hits1 / len(ds), 100.0 * hits5 / len(ds)


@torch.no_grad()
def _log_probs(model: nn.Module, images: ImageSet, batch_size: int, device: str | torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([F.log_softmax(model(x).float(), dim=1)
                      for x, _ in make_loader(images, batch_size, device=device, train=False, path="device")])


def divergence_from(reference: nn.Module, images: ImageSet, *, batch_size: int = 256,
                    device: str | torch.device = "cpu") -> Callable[[nn.Module], float]:
    """How far a model's outputs moved from ``reference``'s on ``images``: the mean over images of
    KL(p_reference || p_model) of the class probabilities. No label is read; the reference's
    probabilities are computed once."""
    target = _log_probs(reference, images, batch_size, device)

    def loss_of(model: nn.Module) -> float:
        return _kl(target, _log_probs(model, images, batch_size, device))

    return loss_of


def _kl(target: torch.Tensor, log_probs: torch.Tensor) -> float:
    return float((target.exp() * (target - log_probs)).sum(1).mean())


def fidelity(reference: nn.Module, model: nn.Module, images: ImageSet, *, batch_size: int = 256,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """``model`` against ``reference`` on ``images`` (held-out training images that choose a recipe): top-1
    against the labels, agreement with the reference's predictions, and KL(p_reference || p_model)."""
    target = _log_probs(reference, images, batch_size, device)
    log_probs = _log_probs(model, images, batch_size, device)
    labels = images.labels.to(log_probs.device)
    prediction = log_probs.argmax(1)
    return {"images": len(images), "top1": 100.0 * float((prediction == labels).float().mean()),
            "agreement": 100.0 * float((prediction == target.argmax(1)).float().mean()),
            "kl": _kl(target, log_probs)}


def evaluate(model: nn.Module, test: ImageSet | FolderSet, *, device: str | torch.device = "cpu",
             latency_batches: tuple[int, ...] = (1, 64), latency_repeats: int = 20,
             batch_size: int = 500, known_accuracy: tuple[float, float] | None = None) -> Metrics:
    """Accuracy on the whole ``test`` split (unless ``known_accuracy`` gives top-1/top-5 already
    measured on it), MACs/params at its image size, latency per batch size."""
    hw = input_shape(test)[1:]
    top1, top5 = known_accuracy or accuracy(model, test, device=device, batch_size=batch_size)
    latency = {f"b{b}": model_latency(model, b, device=device, input_hw=hw, repeats=latency_repeats)
               for b in latency_batches}
    return Metrics(top1, top5, count_macs(model, (1, 3, *hw)), count_params(model), latency)


def evaluate_pair(base: nn.Module, pruned: nn.Module, test: ImageSet | FolderSet, *, device: str | torch.device = "cpu",
                  latency_batches: tuple[int, ...] = (1, 64), latency_repeats: int = 20,
                  runtimes: tuple[str, ...] = ("torch",), latency_threads: int | None = None,
                  batch_size: int = 500,
                  known_accuracy: tuple[tuple[float, float] | None, tuple[float, float] | None] = (None, None),
                  cache: Cache | None = None) -> tuple[Metrics, Metrics, list[PairLatency]]:
    """``evaluate`` of a base model and its pruned copy, their latencies timed together
    (``latency.measure_pair``) for each runtime in ``runtimes``.

    Each model's ``latency_ms`` holds its eager PyTorch medians; the returned pairs hold every runtime's
    medians, spreads, speed-ups and ``trusted`` flags. With ``cache``, the pairs of two architectures already
    timed on this machine with the same settings come from it (``latency_pairs``).
    """
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(f"latency runtimes {list(runtimes)}; accepted: one or more of {', '.join(RUNTIMES)}")
    hw = input_shape(test)[1:]
    pairs = latency_pairs(base, pruned, hw, device=device, batches=latency_batches, repeats=latency_repeats,
                          runtimes=runtimes, threads=latency_threads, cache=cache)
    eager = [p for p in pairs if p.runtime == "torch"]
    metrics = [evaluate(m, test, device=device, latency_batches=(), batch_size=batch_size, known_accuracy=acc)
               for m, acc in zip((base, pruned), known_accuracy)]
    base_metrics, pruned_metrics = (
        replace(m, latency_ms={f"b{p.batch}": getattr(p, f"{side}_ms") for p in eager})
        for m, side in zip(metrics, ("base", "pruned")))
    return base_metrics, pruned_metrics, pairs


def latency_pairs(base: nn.Module, pruned: nn.Module, hw: tuple[int, ...], *, device: str | torch.device,
                  batches: Sequence[int], repeats: int, runtimes: Sequence[str], threads: int | None,
                  cache: Cache | None = None) -> list[PairLatency]:
    """``latency.measure_pair`` for every runtime. With ``cache``, the latency of a pair of architectures
    (layer shapes, not weights) already timed on this machine (host, CPU, torch and ONNX Runtime versions,
    threads) at the same input size, batches, repeats and device is read from it: the models of a sweep
    that differ only in which channels they keep are timed once."""
    def measure() -> list[dict]:
        pairs = []
        for runtime in runtimes:
            log.info("latency (%s): base and pruned model timed in turn, batch sizes %s, %d rounds", runtime,
                     ", ".join(map(str, batches)), repeats)
            pairs += measure_pair(base, pruned, batches, runtime=runtime, device=device, input_hw=tuple(hw),
                                  repeats=repeats, threads=threads)
        return [p.to_dict() for p in pairs]

    if cache is None:
        return [PairLatency(**d) for d in measure()]
    key = fingerprint("latency", _shapes(base), _shapes(pruned), list(hw), list(batches), repeats, list(runtimes),
                      threads, str(device), _machine(runtimes))
    raw, hit = cache.get_or_compute("latency", key, measure)
    if hit:
        log.info("latency: these two architectures were timed before on this machine with the same settings "
                 "(cache entry latency/%s); not timed again", key)
    return [PairLatency(**d) for d in raw]


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {"class": type(model).__name__, **{k: list(v.shape) for k, v in model.state_dict().items()}}


def _machine(runtimes: Sequence[str]) -> dict[str, object]:
    """What a latency depends on beside the models and the options."""
    machine: dict[str, object] = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                                  "cores": os.cpu_count(), "torch": torch.__version__,
                                  "torch_threads": torch.get_num_threads()}
    if "onnxruntime" in runtimes:
        import onnxruntime

        machine["onnxruntime"] = onnxruntime.__version__
    return machine


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


def evaluate_stage(base: nn.Module, pruned: nn.Module, test_set: ImageSet | FolderSet, spec: EvalSpec,
                   cache: Cache, *, device: str | torch.device = "cpu", progress: bool = False
                   ) -> tuple[Metrics, Metrics, list[PairLatency]]:
    """Evaluate stage: both models' metrics, their latencies timed together per runtime; the accuracy of a
    model already seen on these test images, and the latency of a pair of architectures already timed on
    this machine with the same settings, come from the cache."""
    def cached_accuracy(model: nn.Module) -> tuple[float, float]:
        def measure() -> list[float]:
            return list(accuracy(model, test_set, device=device, batch_size=spec.batch_size, progress=progress))

        key = fingerprint("accuracy", model_fingerprint(model), test_set.content_key(), test_set.mean,
                          test_set.std)
        return tuple(cache.get_or_compute("accuracy", key, measure)[0])

    known = (cached_accuracy(base), cached_accuracy(pruned))
    if not spec.latency_batches:
        return (*(evaluate(m, test_set, device=device, latency_batches=(), known_accuracy=acc)
                  for m, acc in zip((base, pruned), known)), [])
    return evaluate_pair(base, pruned, test_set, device=device, latency_batches=spec.latency_batches,
                         latency_repeats=spec.latency_repeats, runtimes=spec.runtimes, batch_size=spec.batch_size,
                         known_accuracy=known, cache=cache)
