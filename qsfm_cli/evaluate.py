"""Evaluation stage: accuracy, MACs and parameters counted as the papers do (``qsfm_cli.counting``), and
latency; the label-free divergence the planner is given to measure pruned copies; a model's fidelity to
the original on held-out training images (what recipes are chosen by)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .counting import count_macs, count_params
from .data import ImageSet
from .latency import RUNTIMES, PairLatency, measure_pair, model_latency
from .loaders import input_shape, make_loader
from .record import Metrics

if TYPE_CHECKING:
    from .imagefolder import FolderSet


@torch.no_grad()
def accuracy(model: nn.Module, ds: ImageSet | FolderSet, *, device: str | torch.device = "cpu",
             batch_size: int = 500) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent on every image of ``ds``."""
    model.eval()
    hits1 = hits5 = 0
    for x, y in make_loader(ds, batch_size, device=device, train=False, path="device"):
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
                  ) -> tuple[Metrics, Metrics, list[PairLatency]]:
    """``evaluate`` of a base model and its pruned copy, their latencies timed together
    (``latency.measure_pair``) for each runtime in ``runtimes``.

    Each model's ``latency_ms`` holds its eager PyTorch medians; the returned pairs hold every runtime's
    medians, spreads, speed-ups and ``trusted`` flags.
    """
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(f"latency runtimes {list(runtimes)}; accepted: one or more of {', '.join(RUNTIMES)}")
    hw = input_shape(test)[1:]
    pairs = [pair for runtime in runtimes
             for pair in measure_pair(base, pruned, latency_batches, runtime=runtime, device=device, input_hw=hw,
                                      repeats=latency_repeats, threads=latency_threads)]
    eager = [p for p in pairs if p.runtime == "torch"]
    metrics = [evaluate(m, test, device=device, latency_batches=(), batch_size=batch_size, known_accuracy=acc)
               for m, acc in zip((base, pruned), known_accuracy)]
    base_metrics, pruned_metrics = (
        replace(m, latency_ms={f"b{p.batch}": getattr(p, f"{side}_ms") for p in eager})
        for m, side in zip(metrics, ("base", "pruned")))
    return base_metrics, pruned_metrics, pairs
