"""Post-training recoveries at QSFM's operating point: ResNet-56, CIFAR-10, -48.27% MACs, no fine-tuning.

    python scripts/bench_recover.py --data ../shared/data --checkpoint ../shared/checkpoints/resnet56-4bfd9763.th
    python scripts/bench_recover.py ... --test-images 1000 --images 256 --steps 50     # a quick look
    python scripts/bench_recover.py ... --allocation uniform sensitivity              # also per-set ratios

Per scorer (``--scorers``): statistics of the public checkpoint on ``--collect-images`` training images,
the removal orders, and per allocation (``--allocation``) one plan removing 48.27% of the MACs
(``PlanSpec(target_macs_reduction=0.4827, allocation=...)``; ``sensitivity`` measures each set's
divergence from the unpruned network on 256 held-out training images, no labels, pruned without
compensation); then each recovery (``--methods``)
applied to its own copy of the pruned model, the wall time of the recovery alone, and top-1 on
``--test-images`` CIFAR-10 test images (all 10,000 by default, else a seeded sample). ``lstsq+bn`` is the
moments fold of ``qsfm_cli.recover.compensate`` then BatchNorm re-estimation on the calibration images;
``sequential`` and ``blockwise`` run with their defaults except what ``--images``, ``--batch-size``,
``--steps``, ``--lr`` set. Calibration: ``--images`` training images drawn with ``--seed``, no labels.
``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from qsfm_cli.checkpoints import PRETRAINED_MEAN, PRETRAINED_STD, load_weights
from qsfm_cli.collect import collect_stats
from qsfm_cli.data import load_dataset
from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.evaluate import accuracy, divergence_from
from qsfm_cli.models import create_model
from qsfm_cli.files import atomic_write
from qsfm_cli.plan import ALLOCATIONS, PlanSpec, make_keep
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.recover import get_recovery, recalibrate_bn
from qsfm_cli.recover.compensate import compensate
from qsfm_cli.scoring import get_scorer
from qsfm_cli.scoring.base import StatRequest

METHODS = ("none", "lstsq+bn", "sequential", "blockwise")
TARGET = 0.4827
SENSITIVITY_IMAGES = 256


def recover(method: str, model, keep, sets, stats, orders, calib, example, args) -> torch.nn.Module:
    """A fresh pruned copy of ``model`` repaired by ``method``."""
    if method == "none":
        return apply_keep(model, keep, example).eval()
    if method == "lstsq+bn":
        folded = copy.deepcopy(model)
        compensate(folded, sets, stats, orders, keep, "lstsq")
        return recalibrate_bn(apply_keep(folded, keep, example), calib, len(calib), device=args.device)
    given = {"images": args.images, "batch_size": args.batch_size}
    if method == "blockwise":
        given.update(steps=args.steps, lr=args.lr)
    pruned = apply_keep(model, keep, example).eval()
    recovery = get_recovery(method, **{k: v for k, v in given.items() if v is not None}).method
    status = recovery.refit(model, pruned, sets, keep, calib, seed=args.seed, device=args.device,
                            progress=args.progress)
    skipped = {k: str(v) for k, v in status.items() if not v.done}
    if skipped:
        print(f"  {method}: skipped {skipped}")
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset root holding cifar-10-batches-py/")
    parser.add_argument("--checkpoint", required=True, help="resnet56-4bfd9763.th")
    parser.add_argument("--scorers", nargs="+", default=["qsfm", "l1"])
    parser.add_argument("--allocation", nargs="+", default=["uniform"], choices=ALLOCATIONS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--collect-images", type=int, default=512, help="images the scorer's statistics use")
    parser.add_argument("--images", type=int, default=2048, help="calibration images of every recovery")
    parser.add_argument("--batch-size", type=int, default=None, help="recovery batch size")
    parser.add_argument("--steps", type=int, default=None, help="blockwise Adam steps per block")
    parser.add_argument("--lr", type=float, default=None, help="blockwise Adam learning rate")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    train, test = load_dataset("cifar10", args.data, download=False)
    train, test = (s.with_normalization(PRETRAINED_MEAN, PRETRAINED_STD) for s in (train, test))
    test = test.sample(args.test_images, seed=args.seed)
    calib = train.sample(args.images, seed=args.seed)
    model = load_weights(create_model("resnet56"), args.checkpoint).eval().to(args.device)
    example = torch.zeros(1, 3, 32, 32, device=args.device)
    sets = channel_sets(model, example)
    base_macs, base_params = count_macs(model), count_params(model)
    print(f"ResNet-56, {len(test)} test images, {args.images} calibration images, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'scorer':<6} {'allocation':<11} {'recovery':<11} {'top-1':>6} {'MACs -%':>7} {'params -%':>9} "
          f"{'time s':>7}", flush=True)
    rows = []
    for name in args.scorers:
        scorer = get_scorer(name)
        stats = collect_stats(model, sets, train.sample(args.collect_images, seed=args.seed),
                              scorer.requests() | {StatRequest.moments()}, device=args.device,
                              progress=args.progress)
        orders = scorer.score(model, sets, stats)
        for allocation in args.allocation:
            loss_of = (divergence_from(model, train.held_out(SENSITIVITY_IMAGES, args.seed), device=args.device)
                       if allocation == "sensitivity" else None)
            keep, _ = make_keep(orders, sets, PlanSpec(target_macs_reduction=TARGET, allocation=allocation),
                                model=model, example_input=example, loss_of=loss_of)
            for method in args.methods:
                start = time.perf_counter()
                repaired = recover(method, model, keep, sets, stats, orders, calib, example, args)
                seconds = time.perf_counter() - start
                top1, _ = accuracy(repaired, test, device=args.device)
                row = {"scorer": name, "allocation": allocation, "recovery": method, "top1": top1,
                       "macs_reduction": 100 * (1 - count_macs(repaired) / base_macs),
                       "params_reduction": 100 * (1 - count_params(repaired) / base_params),
                       "seconds": round(seconds, 1), "images": args.images, "test_images": len(test)}
                rows.append(row)
                print(f"{name:<6} {allocation:<11} {method:<11} {top1:>6.2f} {row['macs_reduction']:>7.2f} "
                      f"{row['params_reduction']:>9.2f} {seconds:>7.0f}", flush=True)
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(rows, indent=1).encode()))


if __name__ == "__main__":
    main()
