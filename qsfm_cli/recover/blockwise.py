"""Blockwise reconstruction: each block tuned, after its least-squares fit, to reproduce its original output.

The network is walked as ``sequential`` walks it (same blocks, same order, same least-squares start). A
least-squares fit is linear per layer: it cannot see the ReLU between a block's convs, the BatchNorm
scales, or what the layers before the last one could do for it. So each block whose consumers were just
refit is then optimized as a whole (as in BRECQ and AdaRound: a local objective, no labels, no gradient
from the rest of the network): ``steps`` Adam steps, learning rate ``lr`` annealed to zero on a cosine,
on minibatches of ``batch_size`` calibration images, minimizing

    || block_pruned(x_p) - block_original(x_o)[kept channels] ||^2

with ``x_p`` the block's input in the pruned (already reconstructed) network and ``x_o`` in the original
one. Every weight and bias of the block's conv and linear layers and its BatchNorms' affine parameters
are trained (running statistics stay as they are); if the block's error over all calibration images
did not go down, the least-squares weights are put back. A lone layer (no block around it, see
``qsfm_cli.pruning.block_of``) is left at its least-squares fit, which already minimizes its error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..types import ChannelSet, Keep, SetStatus
from .base import Tuning, register_recovery
from .sequential import Block, Sequential, reconstruct


def block_error(pruned: nn.Module, block: Block, x_p: torch.Tensor, target: torch.Tensor,
                batch_size: int) -> float:
    """Mean squared error of the pruned block's output over all of ``x_p``."""
    total = 0.0
    with torch.no_grad():
        for x, t in zip(x_p.split(batch_size), target.split(batch_size)):
            total += F.mse_loss(block.run(pruned, x), t, reduction="sum").item()
    return total / target.numel()


def tune_block(pruned: nn.Module, block: Block, x_p: torch.Tensor, y_o: torch.Tensor, *, steps: int,
               lr: float, batch_size: int, seed: int) -> str:
    """Adam on the block's reconstruction error (see the module docstring), on minibatches drawn with
    ``seed``; says what it did."""
    if block.modules == tuple(block.layers[:1]) or steps == 0:
        return ""
    target = y_o if block.keep is None else y_o[:, block.keep]
    params = [p for name in block.modules for p in pruned.get_submodule(name).parameters()]
    before = block_error(pruned, block, x_p, target, batch_size)
    tuning = Tuning(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            pick = torch.randint(len(x_p), (min(batch_size, len(x_p)),), generator=generator).to(x_p.device)
            loss = F.mse_loss(block.run(pruned, x_p[pick]), target[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    after = block_error(pruned, block, x_p, target, batch_size)
    tuning.finish(keep=after < before)
    if not after < before:
        return f"block {block.name}: {steps} Adam steps did not lower its error {before:.4g}, least squares kept"
    return f"block {block.name} error {before:.4g} -> {after:.4g} after {steps} Adam steps"


@register_recovery
@dataclass(frozen=True)
class Blockwise(Sequential):
    """``sequential``, then each block tuned by Adam on its local reconstruction error (module docstring)."""

    name = "blockwise"
    batch_size: int = 64
    steps: int = 200
    lr: float = 3e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 0:
            raise ValueError(f"recover.steps={self.steps}; accepted: >= 0 (0: the least-squares fit alone)")
        if not self.lr > 0:
            raise ValueError(f"recover.lr={self.lr}; accepted: > 0")

    def refit(self, original: nn.Module, pruned: nn.Module, sets: list[ChannelSet], keep: Keep,
              images: ImageSet, *, seed: int, device: str | torch.device = "cpu",
              progress: bool = False) -> dict[str, SetStatus]:
        def tune(block: Block, x_p: torch.Tensor, y_o: torch.Tensor) -> str:
            return tune_block(pruned, block, x_p, y_o, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                              seed=seed)

        return reconstruct(original, pruned, sets, keep, images, ridge=self.ridge, batch_size=self.batch_size,
                           positions=self.positions, seed=seed, target=self.target, tune=tune, device=device,
                           progress=progress)
