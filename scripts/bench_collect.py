"""Collect + score (QSFM, ssim) for a CIFAR ResNet's block-internal channels vs bare forward passes.

    python scripts/bench_collect.py --data ../shared/data --checkpoint ../shared/checkpoints/resnet56-4bfd9763.th
    python scripts/bench_collect.py          # synthetic images, untrained weights: the same work, for speed only

Both runs see the same ``--num-images`` CIFAR-10 training images (seeded sample) in batches of
``--batch-size`` on ``--device``; each is timed ``--repeats`` times and the fastest run is reported, so that
a busy machine inflates neither side. Prints both times and their ratio.
"""
from __future__ import annotations

import argparse
import time

import torch

from qsfm_cli.checkpoints import load_weights
from qsfm_cli.collect import collect_stats
from qsfm_cli.data import load_dataset
from qsfm_cli.loaders import DeviceLoader
from qsfm_cli.models import create_model, model_card
from qsfm_cli.pruning import channel_sets
from qsfm_cli.scoring import get_scorer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="CIFAR-10 root; synthetic images when absent")
    parser.add_argument("--checkpoint", help="weights; untrained when absent")
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.data:
        train, _ = load_dataset("cifar10", args.data, download=False, verify=False)
    else:
        train, _ = load_dataset("fake", size=32, train_size=args.num_images, test_size=1, seed=args.seed)
    card = model_card(args.model)
    images = train.with_normalization(card.mean, card.std).sample(args.num_images, args.seed)
    model = create_model(args.model)
    if args.checkpoint:
        model = load_weights(model, args.checkpoint)
    model = model.eval().to(device)
    sets = channel_sets(model, torch.zeros(1, 3, 32, 32, device=device), "default")   # each block's conv1
    scorer = get_scorer("qsfm")

    def forward() -> None:
        with torch.inference_mode():
            for x, _ in DeviceLoader(images, args.batch_size, device=device):
                model(x)
        sync(device)

    def collect_and_score() -> dict:
        stats = collect_stats(model, sets, images, scorer.requests(), batch_size=args.batch_size, device=device)
        orders = scorer.score(model, sets, stats)
        sync(device)
        return orders

    forward()
    collect_and_score()                                  # warm-up: allocator, band matrices, kernels
    forward_times, collect_times = [], []
    for _ in range(args.repeats):                        # interleaved, so both see the same machine load
        start = time.perf_counter()
        forward()
        forward_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        orders = collect_and_score()
        collect_times.append(time.perf_counter() - start)
    fwd, col = min(forward_times), min(collect_times)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; {args.model}, "
          f"{len(sets)} block-internal channel sets, {len(images)} images, batch {args.batch_size}")
    print(f"bare forward passes       {fwd:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in forward_times)})")
    print(f"collect + score (qsfm)    {col:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in collect_times)})")
    print(f"ratio                     {col / fwd:8.2f} x  (target: <= 8x on CPU, <= 3x on GPU)")
    first = sets[0].name
    print(f"{first}: first removals {orders[first].removal[:6]}, S of their pairs "
          f"{[round(v, 3) for v in orders[first].values[:6]]}")


if __name__ == "__main__":
    main()
