"""Datasets as uint8 image tensors: small enough (CIFAR: 150 MB) to live whole on the device.

Every dataset comes back as two ``ImageSet``s (train, test); normalization and augmentation happen later
in batched tensor ops (``qsfm_cli.loaders``), so the same data serves training, collection and evaluation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class ImageSet:
    """Images ``[N, 3, H, W]`` uint8 and labels ``[N]`` int64, with the normalization to apply."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, images=self.images[index], labels=self.labels[index])

    def sample(self, n: int, seed: int) -> "ImageSet":
        """``n`` images drawn without replacement, the same ones for the same seed."""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        return self.subset(torch.randperm(len(self), generator=g)[:n].sort().values)

    def with_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> "ImageSet":
        return replace(self, mean=tuple(mean) if mean else self.mean, std=tuple(std) if std else self.std)


DATASETS = ("cifar10", "cifar100", "digits", "fake")


def load_dataset(name: str, root: str | None = None, *, download: bool = True, verify: bool | str = "auto",
                 num_classes: int | None = None, size: int = 32, train_size: int = 512,
                 test_size: int = 256, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Return ``(train, test)`` for one of ``DATASETS``.

    ``root``/``download``/``verify`` apply to CIFAR; ``num_classes``, ``size``, ``train_size``, ``test_size``
    and ``seed`` to ``fake``; ``digits`` is split 80/20 with ``seed``.
    """
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, download=download, verify=verify)
    if name == "digits":
        return _digits(seed)
    if name == "fake":
        return _fake(num_classes or 10, size, train_size, test_size, seed)
    raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")


VERIFY_MODES = (True, False, "auto")


def _cifar(name: str, root: str | None, *, download: bool, verify: bool | str) -> tuple[ImageSet, ImageSet]:
    """torchvision's CIFAR. ``verify``: ``True`` refuses files whose MD5 differs from torchvision's list;
    ``False`` skips the check; ``"auto"`` checks, and when a local copy fails it (a copy rebuilt from a
    lossless export, or holding only some training batches) uses it with a warning saying so."""
    from torchvision import datasets

    if verify not in VERIFY_MODES:
        raise ValueError(f"dataset.verify={verify!r}; accepted: true, false, auto")
    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = str(Path(root or "data").expanduser())

    class Unverified(base):  # type: ignore[misc, valid-type]
        """torchvision's CIFAR without its MD5 check; a copy that holds only some of the training batches
        serves those."""

        def __init__(self, root: str, **kwargs):
            folder = Path(root) / self.base_folder
            self.train_list = [e for e in base.train_list if (folder / e[0]).is_file()]
            super().__init__(root, **kwargs)

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return bool(self.train_list) and all((folder / f).is_file() for f, _ in self.test_list)

    cls = base
    if verify is False or (verify == "auto" and _local_copy_unverified(base, root)):
        cls = Unverified
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    splits = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=download and cls is base)
        except (RuntimeError, OSError) as err:   # missing files; a download without a network
            raise FileNotFoundError(
                f"{name} not found under dataset.root={root!r} ({err}); point dataset.root at a folder "
                f"holding {base.base_folder}/ (dataset.verify=true refuses a copy whose checksums differ)"
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        splits.append(ImageSet(images, labels, len(ds.classes), mean, std, name))
    return splits[0], splits[1]


def _local_copy_unverified(base: type, root: str) -> bool:
    """True when ``root`` holds a usable copy (the test batch and some training batches) that fails
    torchvision's MD5 check; logs what differs."""
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / base.base_folder
    present = [f for f, _ in base.train_list + base.test_list if (folder / f).is_file()]
    if not any(f == base.test_list[0][0] for f in present) or len(present) < 2:
        return False
    missing = [f for f, _ in base.train_list if f not in present]
    differing = [f for f, md5 in base.train_list + base.test_list
                 if f in present and not check_integrity(str(folder / f), md5)]
    if missing or differing:
        log.warning("%s: using the local copy as it is (dataset.verify=true refuses it); MD5 differs from "
                    "torchvision's list: %s; missing: %s", folder, ", ".join(differing) or "none",
                    ", ".join(missing) or "none")
    return bool(missing or differing)


def _digits(seed: int) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images), upsampled to 32x32 RGB."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=32, mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    mean, std = (0.5,) * 3, (0.5,) * 3
    full = ImageSet(images, labels, 10, mean, std, "digits")
    return full.subset(perm[:cut].sort().values), full.subset(perm[cut:].sort().values)


def _fake(num_classes: int, size: int, train_size: int, test_size: int,
          seed: int) -> tuple[ImageSet, ImageSet]:
    """Synthetic, learnable images: a fixed random pattern per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, size, size, generator=g) * 255

    def draw(n: int) -> ImageSet:
        labels = torch.randint(num_classes, (n,), generator=g)
        noise = torch.randn(n, 3, size, size, generator=g) * 40
        images = (patterns[labels] + noise).clamp(0, 255).to(torch.uint8)
        return ImageSet(images, labels, num_classes, (0.5,) * 3, (0.25,) * 3, "fake")

    return draw(train_size), draw(test_size)
