"""Batches straight from a device-resident uint8 ``ImageSet``: crop, flip and normalize as tensor ops."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .data import ImageSet


class DeviceLoader:
    """Iterate ``(images, labels)`` batches of ``ds`` on ``device``, normalized to float32.

    With ``train=True`` the order is shuffled (seeded per epoch) and each image gets the standard CIFAR
    augmentation: a random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip.
    """

    def __init__(self, ds: ImageSet, batch_size: int, *, device: str | torch.device = "cpu",
                 train: bool = False, seed: int = 0, drop_last: bool = False, pad: int = 4):
        self.device = torch.device(device)
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        self.mean = torch.tensor(ds.mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(ds.std, device=self.device).view(1, -1, 1, 1) * 255
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        g = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(n, generator=g).to(self.device) if self.train else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            x = (self.images[idx].float() - self.mean) / self.std
            if self.train:
                x = self._augment(x, g)
            yield x, self.labels[idx]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        chan = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        out = padded[batch, chan, rows, cols]
        flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
        return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
