"""Collect + score (QSFM, ssim) at ImageNet resolution vs bare forward passes, with peak memory.

    python scripts/bench_imagenet.py                       # tv_resnet50 and tv_mobilenet_v2, 8 images, CPU
    python scripts/bench_imagenet.py --models tv_resnet50 --num-images 64 --device cuda

Untrained torchvision models (seeded), synthetic 224x224 images (seeded uint8 noise; timing and memory
depend on the shapes, not on the pixels), the default channel sets (ResNet-50: every bottleneck's two inner
convs, maps of 64-512 channels at 56x56 down to 7x7; MobileNetV2: every block's hidden channels). Forward
passes and collection see the same images in batches of ``--batch-size``; each is timed ``--repeats``
times after a warm-up forward and the fastest run is reported. Memory: the peak resident set size (Linux
``/proc``, sampled every 5 ms) above what the process held before the timed runs.
"""
from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from qsfm_cli.collect import collect_stats
from qsfm_cli.data import ImageSet
from qsfm_cli.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from qsfm_cli.loaders import DeviceLoader
from qsfm_cli.models import create_model
from qsfm_cli.pruning import channel_sets
from qsfm_cli.scoring import get_scorer

_STATM = Path("/proc/self/statm")


def rss_bytes() -> int:
    """Resident set size now (0 where /proc is absent)."""
    if not _STATM.is_file():
        return 0
    import os

    return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss(record: list[int]):
    """Appends the peak RSS above the starting RSS seen while the block runs."""
    start, peak, done = rss_bytes(), [rss_bytes()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        record.append(max(peak[0], rss_bytes()) - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, images: ImageSet, args, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    model = create_model(name, num_classes=1000).eval().to(device)
    size = images.images.shape[-1]
    sets = channel_sets(model, torch.zeros(1, 3, size, size, device=device), "default")
    scorer = get_scorer("qsfm")
    shapes: dict[str, tuple[int, ...]] = {}

    def record(key: str):
        def hook(_module, inputs) -> None:
            shapes[key] = tuple(inputs[0].shape[1:])
        return hook

    hooks = [model.get_submodule(s.tap).register_forward_pre_hook(record(s.name)) for s in sets if s.tap_input]
    with torch.inference_mode():
        model(images.images[:1].float().to(device))
    for h in hooks:
        h.remove()

    def forward() -> None:
        with torch.inference_mode():
            for x, _ in DeviceLoader(images, args.batch_size, device=device):
                model(x)
        sync(device)

    def collect_and_score() -> None:
        stats = collect_stats(model, sets, images, scorer.requests(), batch_size=args.batch_size, device=device)
        scorer.score(model, sets, stats)
        sync(device)

    forward()
    forward_times, collect_times, forward_mem, collect_mem = [], [], [], []
    for _ in range(args.repeats):                 # interleaved, so both see the same machine load
        with peak_rss(forward_mem):
            start = time.perf_counter()
            forward()
            forward_times.append(time.perf_counter() - start)
        with peak_rss(collect_mem):
            start = time.perf_counter()
            collect_and_score()
            collect_times.append(time.perf_counter() - start)
    fwd, col = min(forward_times), min(collect_times)
    channels = sorted({c for c, *_ in shapes.values()})
    sides = sorted({hw[0] for _, *hw in shapes.values()}, reverse=True)
    print(f"\n{name}: {len(sets)} channel sets, {channels[0]}-{channels[-1]} channels, maps "
          f"{'/'.join(f'{s}x{s}' for s in sides)}; {len(images)} images {size}x{size}, batch {args.batch_size}")
    print(f"  bare forward passes     {fwd:8.3f} s   peak RSS +{max(forward_mem) / 2**20:7.1f} MiB")
    print(f"  collect + score (qsfm)  {col:8.3f} s   peak RSS +{max(collect_mem) / 2**20:7.1f} MiB")
    print(f"  ratio                   {col / fwd:8.1f} x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tv_resnet50", "tv_mobilenet_v2"])
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    pixels = torch.randint(0, 256, (args.num_images, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    images = ImageSet(pixels, torch.zeros(args.num_images, dtype=torch.long), 1000, IMAGENET_MEAN, IMAGENET_STD,
                      "synthetic")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{args.repeats} timed run(s) each")
    for name in args.models:
        bench(name, images, args, device)


if __name__ == "__main__":
    main()
