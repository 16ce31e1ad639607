"""BatchNorm re-estimation: the statistics a pruned network's BatchNorms expect, measured again."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import ImageSet
from ..loaders import DeviceLoader


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: ImageSet, n: int, batch_size: int = 128,
                   device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``n`` images of ``images`` (no augmentation):
    forward passes with only the BatchNorms in training mode (dropout and stochastic depth stay off), a
    cumulative average over all batches, no weight update. Leaves the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if n < 2:
        raise ValueError(f"recover.bn_images needs at least 2 images, got {n}")
    sample = images.sample(n, seed)
    momenta = [bn.momentum for bn in norms]
    model.to(device).eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        # A last batch of one image would break BatchNorm1d on a pooled vector: drop only such a batch.
        lone_last = len(sample) > batch_size and len(sample) % batch_size == 1
        for x, _ in DeviceLoader(sample, batch_size, device=device, drop_last=lone_last):
            model(x)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()
    return model
