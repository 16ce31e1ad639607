"""Training throughput: device-resident uint8 data with batched crop/flip/normalize (``DeviceLoader``) vs
the plain torchvision path (``DataLoader`` + PIL ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
``ToTensor``, ``Normalize`` in worker processes), same model, batch, precision and memory format.

Data are synthetic CIFAR-shaped uint8 images generated here (no dataset files needed). Prints images/s
of the data path alone and of full training steps (forward + backward + SGD step), and their ratios.

    python scripts/bench_train.py                       # ResNet-56, batch 256, device auto
    python scripts/bench_train.py --steps 6 --warmup 2 --images 4096     # a quick CPU run
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from qsfm_cli.data import CIFAR_MEAN, CIFAR_STD, ImageSet
from qsfm_cli.loaders import DeviceLoader, ImageSetDataset, train_transform
from qsfm_cli.models import create_model
from qsfm_cli.train import resolve_amp

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def synthetic_cifar(n: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageSet(images, labels, 10, CIFAR_MEAN, CIFAR_STD, "synthetic")


def device_batches(ds: ImageSet, batch: int, device: torch.device, channels_last: bool) -> Batches:
    loader = DeviceLoader(ds, batch, device=device, train=True, seed=0, drop_last=True,
                          channels_last=channels_last)
    for epoch in itertools.count():
        yield from loader.iter_epoch(epoch)


def torchvision_batches(ds: ImageSet, batch: int, device: torch.device, channels_last: bool,
                        workers: int) -> Batches:
    loader = DataLoader(ImageSetDataset(ds, train_transform(ds)), batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _ in itertools.count():
        for x, y in loader:
            yield x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True)


def timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device, window: int) -> float:
    """Seconds per step after ``warmup`` untimed steps: the median over windows of ``window`` steps.
    The median shrugs off bursts of load from other processes on a shared CPU; windows of several steps
    keep a GPU's queue full (a sync after every step would hide the CPU's launch overhead no more)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(max(1, steps // window)):
        sync(device)
        start = time.perf_counter()
        for _ in range(window):
            step()
        sync(device)
        times.append((time.perf_counter() - start) / window)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(batches: Batches, args: argparse.Namespace, device: torch.device) -> float:
    def step() -> None:
        x, _ = next(batches)
        x.sum()   # touch the data so asynchronous copies are counted
    return args.batch / timed(step, args.warmup, args.steps, device, args.window)


def train_rate(batches: Batches, args: argparse.Namespace, device: torch.device) -> float:
    torch.manual_seed(0)
    model: nn.Module = create_model(args.model, num_classes=10).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        x, y = next(batches)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return args.batch / timed(step, args.warmup, args.steps, device, args.window)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed training steps per path")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (workers, cuDNN, compile)")
    p.add_argument("--images", type=int, default=None, help="synthetic images (default 50000 on CUDA, 4096 on CPU)")
    p.add_argument("--window", type=int, default=None,
                   help="steps per timing window, median over windows (default 10 on CUDA, 1 on CPU)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"))
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both paths)")
    args = p.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.window = args.window or (10 if device.type == "cuda" else 1)
    ds = synthetic_cifar(args.images or (50_000 if device.type == "cuda" else 4096))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    dtype = resolve_amp(args.amp, device)
    print(f"device {name}; model {args.model}; batch {args.batch}; amp {dtype or 'fp32'}; channels_last "
          f"{args.channels_last}; compile {args.compile}; {len(ds)} synthetic images; torchvision workers "
          f"{args.workers}; {args.warmup} warm-up + {args.steps} timed steps (median of {args.window}-step "
          f"windows)")

    paths: dict[str, Callable[[], Batches]] = {
        "device": lambda: device_batches(ds, args.batch, device, args.channels_last),
        "torchvision": lambda: torchvision_batches(ds, args.batch, device, args.channels_last, args.workers),
    }
    rates: dict[str, tuple[float, float]] = {}
    for label, make in paths.items():
        batches = make()
        data_only = loader_rate(batches, args, device)
        training = train_rate(batches, args, device)
        batches.close()   # stops the DataLoader's workers before the next path is timed
        rates[label] = (data_only, training)
        print(f"{label:>12}: data path alone {data_only:10.0f} img/s   training {training:8.0f} img/s", flush=True)
    (d_data, d_train), (t_data, t_train) = rates["device"], rates["torchvision"]
    print(f"device / torchvision: data path x{d_data / t_data:.1f}, training x{d_train / t_train:.2f}")


if __name__ == "__main__":
    main()
