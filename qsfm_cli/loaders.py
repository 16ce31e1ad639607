"""Batches of an ``ImageSet`` for training and evaluation, in two interchangeable flavours.

``DeviceLoader`` keeps the whole uint8 dataset on the device and does crop + flip + normalize as one
batched gather per batch: no Python work per image, so a GPU is never starved (CIFAR: 150 MB).
``TorchvisionLoader`` is the classic ``DataLoader`` + PIL-transform path (worker processes), for datasets
that do not fit on the device, and the only path of a folder-backed ``FolderSet`` (ImageNet), whose workers
decode files into uint8 tensors that are normalized on the device. Both have the same contract: ``(x, y)``
float32 normalized images and int64 labels on ``device``, and a shuffle + augmentation that is a pure
function of ``(seed, epoch)`` so a run resumed mid-epoch sees exactly the batches an uninterrupted run would
(``iter_epoch(epoch, start_batch)``).

Data-parallel training gives each rank a ``shard=(rank, world)``: a training loader yields the rank's
``batch_size // world`` images of every global batch of ``batch_size`` (the same images, crops and flips a
single process would use for that batch), an evaluation loader a contiguous share of the images.
"""
from __future__ import annotations

import hashlib
import signal
from typing import TYPE_CHECKING, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import ImageSet

if TYPE_CHECKING:
    from .imagefolder import FolderSet

PATHS = ("auto", "device", "torchvision")


def epoch_seed(seed: int, epoch: int, salt: str = "") -> int:
    """A 63-bit seed for ``(seed, epoch)``: hashing keeps different pairs from colliding."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def shard_positions(n: int, batch_size: int, *, drop_last: bool, train: bool, rank: int = 0,
                    world: int = 1) -> torch.Tensor:
    """Positions in an epoch's order that rank ``rank`` of ``world`` reads, in reading order.

    Training: global batch k covers positions ``[k * batch_size, (k + 1) * batch_size)`` and each rank reads
    its ``batch_size // world`` consecutive ones (so the ranks' local batches together are exactly the
    single-process batch); evaluation: a contiguous ``1 / world`` share of all positions.
    """
    if not 0 <= rank < world:
        raise ValueError(f"shard rank {rank} outside [0, {world})")
    if world == 1:
        return torch.arange(min(n, _num_batches(n, batch_size, drop_last) * batch_size))
    if not train:
        return torch.arange(rank * n // world, (rank + 1) * n // world)
    if batch_size % world or not drop_last:
        raise ValueError(f"a training batch of {batch_size} images split over {world} ranks must divide evenly "
                         f"and drop the last partial batch (drop_last={drop_last})")
    local = batch_size // world
    steps = n // batch_size
    return torch.arange(steps * batch_size).view(steps, batch_size)[:, rank * local:(rank + 1) * local].reshape(-1)


class _EpochLoader:
    """What both loaders share: the checked settings, this rank's positions and batch size, the batch count,
    and iteration that walks epochs 0, 1, 2, ... (subclasses define ``iter_epoch``)."""

    def __init__(self, ds: ImageSet | FolderSet, batch_size: int, device: str | torch.device, drop_last: bool,
                 channels_last: bool, train: bool, shard: tuple[int, int]):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.train = train
        rank, world = shard
        self.positions = shard_positions(len(ds), batch_size, drop_last=drop_last, train=train, rank=rank,
                                         world=world)
        self.local_batch = batch_size // world if train else batch_size
        self.num_images = len(self.positions)
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.num_images // self.local_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iter_epoch(epoch)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def _normalizer(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``x * scale + shift == (x / 255 - mean) / std`` for uint8 ``x``."""
    std = torch.tensor(std, dtype=torch.float32)
    mean = torch.tensor(mean, dtype=torch.float32)
    return (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device), (-mean / std).view(1, -1, 1, 1).to(device)


def _normalize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # For an NCHW view of NHWC memory addcmul keeps that layout (channels_last).
    out = torch.addcmul(shift, x.float(), scale)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class DeviceLoader(_EpochLoader):
    """Iterate ``(images, labels)`` batches of ``ds`` on ``device``, normalized to float32.

    With ``train=True`` the order is shuffled and each image gets the standard CIFAR augmentation: a random
    crop of the image zero-padded by ``pad`` pixels (black, as torchvision's ``RandomCrop(padding=4)``) and a
    random horizontal flip. ``channels_last=True`` returns batches in that memory format at no extra cost.
    Iterating the loader itself walks epochs 0, 1, 2, ...; ``iter_epoch`` picks one explicitly.
    """

    def __init__(self, ds: ImageSet, batch_size: int, *, device: str | torch.device = "cpu",
                 train: bool = False, seed: int = 0, drop_last: bool = False, pad: int = 4,
                 channels_last: bool = False, shard: tuple[int, int] = (0, 1)):
        super().__init__(ds, batch_size, device, drop_last, channels_last, train, shard)
        self.seed = seed
        self.pad = pad if train else 0
        self.height, self.width = ds.images.shape[2], ds.images.shape[3]
        p = self.pad
        # NHWC so that one gather yields a channels_last batch; padded once here, not per batch.
        nhwc = ds.images.permute(0, 2, 3, 1)
        if p:
            nhwc = torch.nn.functional.pad(nhwc, (0, 0, p, p, p, p))
        self.images = nhwc.contiguous().to(self.device)
        self.labels = ds.labels.to(self.device)
        self.total = len(ds)
        self.scale, self.shift = _normalizer(ds.mean, ds.std, self.device)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of ``epoch``; the same for the same (seed, epoch)."""
        b = self.local_batch
        if not self.train:   # positions are a contiguous range: plain slices, no gather
            first = int(self.positions[0]) if self.num_images else 0
            for start in range(first + start_batch * b, first + self.num_images, b):
                stop = min(start + b, first + self.num_images)
                yield self._normalize(self.images[start:stop].permute(0, 3, 1, 2)), self.labels[start:stop]
            return
        positions = self.positions.to(self.device)
        draws = self._draws(epoch)
        for start in range(start_batch * b, self.num_images, b):
            idx, dy, dx, flip = (d[positions[start:start + b]] for d in draws)
            x = self._crop_flip(idx, dy, dx, flip)
            yield self._normalize(x.permute(0, 3, 1, 2)), self.labels[idx]

    def _draws(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """The whole epoch's order, crop offsets and flips, drawn on the CPU (device-independent) and
        moved in one transfer."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, "device-loader"))
        n = self.total
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        packed = torch.stack([order, offsets[0], offsets[1], flip.long()]).to(self.device)
        return packed[0], packed[1], packed[2], packed[3].bool()

    def _crop_flip(self, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                   flip: torch.Tensor) -> torch.Tensor:
        """One advanced-indexing gather: row ``dy + r`` and column ``dx + c`` (mirrored when flipped) of
        each padded image; returns NHWC uint8."""
        h, w = self.height, self.width
        r = torch.arange(h, device=self.device)
        c = torch.arange(w, device=self.device)
        rows = (dy[:, None] + r)[:, :, None]                          # [B, H, 1]
        c = torch.where(flip[:, None], w - 1 - c, c)                  # [B, W]
        cols = (dx[:, None] + c)[:, None, :]                          # [B, 1, W]
        return self.images[idx[:, None, None], rows, cols]            # [B, H, W, C]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return _normalize(x, self.scale, self.shift, self.channels_last)


def train_transform(ds: ImageSet, pad: int = 4):
    """torchvision's standard CIFAR training transform for ``ds``'s size and normalization."""
    from torchvision import transforms as T

    size = (int(ds.images.shape[2]), int(ds.images.shape[3]))
    return T.Compose([T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(ds.mean, ds.std)])


def eval_transform(ds: ImageSet):
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(ds.mean, ds.std)])


class SeededItems(Dataset):
    """A map-style dataset of PIL images through ``transform``; subclasses define ``__len__`` and
    ``load(i) -> (PIL image, label)``.

    An index may be ``i`` (the transform draws from the global RNG, as in any torchvision pipeline) or
    ``(i, seed)``: the transform then draws from a generator seeded with ``seed``, which makes the
    augmentation independent of worker count and order.
    """

    def __init__(self, transform):
        self.transform = transform

    def load(self, i: int):
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.load(i)
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


class ImageSetDataset(SeededItems):
    """An ``ImageSet`` as a ``SeededItems`` dataset."""

    def __init__(self, ds: ImageSet, transform):
        super().__init__(transform)
        self.images = ds.images
        self.labels = ds.labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy()), int(self.labels[i])


class _EpochSampler(Sampler):
    """Yields ``(index, sample_seed)`` for one epoch's ``positions`` from a start position on; both are
    functions of ``(seed, epoch, position)`` only."""

    def __init__(self, n: int, positions: torch.Tensor, train: bool, seed: int):
        self.n, self.positions, self.train, self.seed = n, positions.tolist(), train, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return len(self.positions) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = epoch_seed(self.seed, self.epoch, "torchvision-loader")
        if self.train:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(base)).tolist()
        else:
            order = range(self.n)
        for pos in self.positions[self.start:]:
            yield order[pos], (base + pos) % 2**63


def ignore_sigint(worker_id: int) -> None:
    """A ``DataLoader`` worker's init: Ctrl-C reaches the whole process group; the trainer handles it in
    the main process, and a worker killed by it would turn a clean stop into a "worker exited
    unexpectedly" error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TorchvisionLoader(_EpochLoader):
    """The ``DataLoader`` + PIL-transform path with ``DeviceLoader``'s contract (same constructor keywords,
    ``iter_epoch``, batches on ``device``). For an ``ImageSet`` augmentation follows ``train_transform``;
    a ``FolderSet`` brings its own transforms (``FolderSet.items``) and workers, and its uint8 batches are
    normalized on the device (a quarter of the float32 bytes through pinned memory)."""

    def __init__(self, ds: ImageSet | FolderSet, batch_size: int, *, device: str | torch.device = "cpu",
                 train: bool = False, seed: int = 0, drop_last: bool = False, pad: int = 4,
                 channels_last: bool = False, num_workers: int = 4, shard: tuple[int, int] = (0, 1)):
        super().__init__(ds, batch_size, device, drop_last, channels_last, train, shard)
        self.sampler = _EpochSampler(len(ds), self.positions, train, seed)
        if isinstance(ds, ImageSet):
            items = ImageSetDataset(ds, train_transform(ds, pad) if train else eval_transform(ds))
        else:
            items, num_workers = ds.items(train), ds.num_workers
        self.scale, self.shift = _normalizer(ds.mean, ds.std, self.device)
        self.loader = DataLoader(
            items, batch_size=self.local_batch, sampler=self.sampler, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_sigint)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start = epoch, min(start_batch * self.local_batch, self.num_images)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = _normalize(x, self.scale, self.shift, self.channels_last)
            yield x.contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)


def fits_on_device(ds: ImageSet, device: torch.device, share: float = 0.25) -> bool:
    """Whether ``ds`` (padded for augmentation) takes at most ``share`` of the device's free memory; on
    the CPU the data is in memory already."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    h, w = ds.images.shape[2], ds.images.shape[3]
    padded = ds.images.numel() // (h * w) * (h + 8) * (w + 8)
    return padded <= share * free


def make_loader(ds: ImageSet | FolderSet, batch_size: int, *, device: str | torch.device, train: bool,
                seed: int = 0, drop_last: bool = False, path: str = "auto", num_workers: int = 4,
                channels_last: bool = False, shard: tuple[int, int] = (0, 1)) -> DeviceLoader | TorchvisionLoader:
    """For an ``ImageSet``: a ``DeviceLoader`` when ``path`` is ``device`` (or ``auto`` and the data fits),
    else a ``TorchvisionLoader`` with ``num_workers``. A ``FolderSet`` always goes through a
    ``TorchvisionLoader`` with its own transforms and ``num_workers`` (``dataset.num_workers``): its images
    are files, never a tensor on the device."""
    if path not in PATHS:
        raise ValueError(f"execution.data_path={path}; accepted: {', '.join(PATHS)}")
    device = torch.device(device)
    kwargs = dict(device=device, train=train, seed=seed, drop_last=drop_last, channels_last=channels_last,
                  shard=shard)
    if isinstance(ds, ImageSet) and (path == "device" or (path == "auto" and fits_on_device(ds, device))):
        return DeviceLoader(ds, batch_size, **kwargs)
    return TorchvisionLoader(ds, batch_size, num_workers=num_workers, **kwargs)


def input_shape(ds: ImageSet | FolderSet) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the batches a loader yields for ``ds``."""
    if isinstance(ds, ImageSet):
        return tuple(ds.images.shape[1:])
    return (3, ds.crop_size, ds.crop_size)
