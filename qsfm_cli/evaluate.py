"""Evaluation stage: accuracy, MACs and parameters counted as the papers do, and latency."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .data import ImageSet
from .latency import RUNTIMES, PairLatency, measure_pair, model_latency
from .loaders import DeviceLoader


@dataclass
class Metrics:
    """One model's figures. ``macs`` counts conv and linear multiply-accumulates (FLOPs / 2)."""

    top1: float
    top5: float
    macs: int
    params: int
    latency_ms: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates of one forward pass, from torch's own FLOP counter (matmul/conv ops only)."""
    param = next(model.parameters())
    x = torch.zeros(input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy(model: nn.Module, ds: ImageSet, *, device: str | torch.device = "cpu",
             batch_size: int = 500) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent on every image of ``ds``."""
    model.eval()
    hits1 = hits5 = 0
    for x, y in DeviceLoader(ds, batch_size, device=device):
        top = model(x).topk(min(5, ds.num_classes), dim=1).indices
        hits1 += (top[:, 0] == y).sum().item()
        hits5 += (top == y[:, None]).any(dim=1).sum().item()
    return 100.0 * hits1 / len(ds), 100.0 * hits5 / len(ds)


def evaluate(model: nn.Module, test: ImageSet, *, device: str | torch.device = "cpu",
             latency_batches: tuple[int, ...] = (1, 64), latency_repeats: int = 20,
             batch_size: int = 500, known_accuracy: tuple[float, float] | None = None) -> Metrics:
    """Accuracy on the whole ``test`` split (unless ``known_accuracy`` gives top-1/top-5 already
    measured on it), MACs/params at its image size, latency per batch size."""
    hw = tuple(test.images.shape[-2:])
    top1, top5 = known_accuracy or accuracy(model, test, device=device, batch_size=batch_size)
    latency = {f"b{b}": model_latency(model, b, device=device, input_hw=hw, repeats=latency_repeats)
               for b in latency_batches}
    return Metrics(top1, top5, count_macs(model, (1, 3, *hw)), count_params(model), latency)


def evaluate_pair(base: nn.Module, pruned: nn.Module, test: ImageSet, *, device: str | torch.device = "cpu",
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
    hw = tuple(test.images.shape[-2:])
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
