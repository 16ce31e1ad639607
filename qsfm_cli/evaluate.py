"""Evaluation stage: accuracy, MACs and parameters counted as the papers do, and latency; the MACs meter and
the held-out loss the planner is given to measure pruned copies."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .data import ImageSet
from .latency import RUNTIMES, PairLatency, measure_pair, model_latency
from .loaders import input_shape, make_loader

if TYPE_CHECKING:
    from .imagefolder import FolderSet


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


class MacsMeter:
    """MACs of pruned copies of one model, as ``count_macs`` counts them, without a forward pass each.

    Channel pruning leaves every layer's output resolution unchanged, so a conv/linear layer costs
    (its weight's element count) x (its output positions per image), the positions recorded once on the
    unpruned model. ``exact`` says whether that sum equals ``count_macs`` on the unpruned model; where it
    does not (ops other than conv/linear), every count is ``count_macs`` itself.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.input_size = (1, *example_input.shape[1:])
        self.positions: dict[str, int] = {}
        handles = [m.register_forward_hook(self._record(name)) for name, m in model.named_modules()
                   if isinstance(m, _WEIGHTED)]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example_input[:1])
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        self.exact = self._from_shapes(model) == count_macs(model, self.input_size)
        self.base = self(model)

    def _record(self, name: str):
        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            channels = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            self.positions[name] = self.positions.get(name, 0) + output.numel() // channels
        return hook

    def _from_shapes(self, model: nn.Module) -> int:
        return sum(m.weight.numel() * self.positions.get(name, 0) for name, m in model.named_modules()
                   if isinstance(m, _WEIGHTED))

    def __call__(self, model: nn.Module) -> int:
        return self._from_shapes(model) if self.exact else count_macs(model, self.input_size)

    def reduction(self, model: nn.Module) -> float:
        """Fraction of the unpruned model's MACs that ``model`` saves."""
        return 1.0 - self(model) / self.base


_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


def heldout_loss(train_set: ImageSet, n: int, *, skip: int, seed: int, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> Callable[[nn.Module], float]:
    """Mean cross-entropy of a model on ``n`` training images that ``train_set.sample(skip, seed)`` (the
    images whose statistics were collected) does not hold: the same seeded permutation, next slice."""
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    index = perm[skip:skip + n] if skip < len(train_set) else perm[:0]
    if len(index) == 0:
        raise ValueError(f"no training images left for the sensitivity slice: {len(train_set)} images, "
                         f"{skip} used for statistics; lower collect.num_images")
    images = train_set.subset(index.sort().values)

    @torch.no_grad()
    def loss_of(model: nn.Module) -> float:
        model.eval()
        total = 0.0
        for x, y in make_loader(images, batch_size, device=device, train=False):
            total += F.cross_entropy(model(x), y, reduction="sum").item()
        return total / len(images)

    return loss_of


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
