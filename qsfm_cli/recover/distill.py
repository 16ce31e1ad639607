"""Distillation without labels: the pruned network trained to reproduce the original network's logits.

Whatever recovery ran before it fitted the pruned network locally (a layer, a block); this last step matches
the whole network's output on unlabeled training images (logit matching, Ba & Caruana 2014; Hinton et al.
2015 with soft targets): ``steps`` Adam steps, learning rate ``lr`` cosine-annealed to zero, on minibatches
of ``batch_size`` images randomly cropped and flipped (the same augmented batch through both networks),
minimizing the mean squared difference of the logits. Every weight and bias and the BatchNorms' affine
parameters are trained; running statistics stay as they are (the network stays in eval mode). No label is
read: it is distillation, and every result it touches is labelled so (``+distill<steps>``). If the logit
error over the images (without augmentation) did not go down, the weights from before are put back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..loaders import DeviceLoader
from .base import Tuning


@torch.no_grad()
def logit_error(original: nn.Module, pruned: nn.Module, loader: DeviceLoader) -> float:
    """Mean squared difference of the two networks' logits over every image of ``loader``."""
    total = count = 0.0
    for x, _ in loader:
        total += F.mse_loss(pruned(x), original(x), reduction="sum").item()
        count += x.shape[0]
    return total / count


def distill(original: nn.Module, pruned: nn.Module, images: ImageSet, *, steps: int, lr: float,
            batch_size: int, device: str | torch.device = "cpu", seed: int = 0) -> str:
    """Train ``pruned`` in place on the original's logits (module docstring); says what it did."""
    original.to(device).eval()
    pruned.to(device).eval()
    plain = DeviceLoader(images, batch_size, device=device)
    before = logit_error(original, pruned, plain)
    params = list(pruned.parameters())
    tuning = Tuning(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    augmented = DeviceLoader(images, batch_size, device=device, train=True, seed=seed)
    done, epoch = 0, 0
    with torch.enable_grad():
        while done < steps:
            for x, _ in augmented.iter_epoch(epoch):
                with torch.no_grad():
                    target = original(x)
                loss = F.mse_loss(pruned(x), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                done += 1
                if done == steps:
                    break
            epoch += 1
    after = logit_error(original, pruned, plain)
    tuning.finish(keep=after < before)
    if not after < before:
        return f"distillation: {steps} Adam steps did not lower the logit error {before:.4g}; weights kept"
    return f"distilled: logit error {before:.4g} -> {after:.4g} after {steps} Adam steps on {len(images)} images"
