"""Post-training recoveries at QSFM's operating point: ResNet-56, CIFAR-10, -48.27% MACs, no fine-tuning.

    python scripts/bench_recover.py --data ../shared/data --checkpoint ../shared/checkpoints/resnet56-4bfd9763.th
    python scripts/bench_recover.py ... --test-images 1000 --images 256 --steps 50     # a quick look
    python scripts/bench_recover.py ... --allocation uniform sensitivity              # also per-set ratios

The run's own stage functions, without the pipeline's cache: per scorer (``--scorers``) the collect and
score stages on ``--collect-images`` training images of the public checkpoint (with the statistics every
recovery asks for); per allocation (``--allocation``) the plan stage removing 48.27% of the MACs
(``PlanSpec(target_macs_reduction=0.4827, allocation=...)``; ``sensitivity`` measures each set's
divergence from the unpruned network on 256 held-out training images, no labels, pruned without
compensation); then, per recovery (``--methods``), the
prune and recover stages on their own copy of the model, their wall time, and top-1 on ``--test-images``
CIFAR-10 test images (all 10,000 by default, else a seeded sample). ``lstsq+bn`` is ``recover=lstsq`` with
``recover.bn_images=--images``; ``sequential`` and ``blockwise`` run with their defaults except what
``--images``, ``--batch-size``, ``--steps``, ``--lr`` set. Calibration: training images drawn with
``--seed``, no labels. ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from qsfm_cli.baseline import load_baseline
from qsfm_cli.cache import Cache, RunContext
from qsfm_cli.collect import CollectSpec, collect_stage, content_key
from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.data import load_dataset
from qsfm_cli.evaluate import accuracy
from qsfm_cli.files import atomic_write
from qsfm_cli.models import default_normalization
from qsfm_cli.plan import ALLOCATIONS, PlanSpec, plan_stage
from qsfm_cli.pruning import channel_sets
from qsfm_cli.recover import RecoverySpec, get_recovery, prune_and_recover
from qsfm_cli.scoring import get_scorer, score_stage

METHODS = ("none", "lstsq+bn", "sequential", "blockwise")
TARGET = 0.4827
SENSITIVITY_IMAGES = 256


def recovery_spec(method: str, args: argparse.Namespace) -> RecoverySpec:
    """The ``recover`` config of ``method`` with what the command line sets."""
    if method == "lstsq+bn":
        return get_recovery("lstsq", bn_images=args.images)
    given = {"images": args.images, "batch_size": args.batch_size} if method != "none" else {}
    if method == "blockwise":
        given.update(steps=args.steps, lr=args.lr)
    return get_recovery(method, **{k: v for k, v in given.items() if v is not None})


def no_rescore(*_):
    raise AssertionError("one prune-and-recover step: nothing is re-scored")


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
    train, test = (s.with_normalization(*default_normalization("resnet56", "cifar10")) for s in (train, test))
    test = test.sample(args.test_images, seed=args.seed)
    ctx = RunContext(Cache(tempfile.gettempdir(), enabled=False))
    model = load_baseline("resnet56", train, test, checkpoint=args.checkpoint, seed=args.seed,
                          device=args.device, cache_dir=ctx.cache.root).eval().to(args.device)
    example = torch.zeros(1, 3, 32, 32, device=args.device)
    sets = channel_sets(model, example)
    specs = {method: recovery_spec(method, args) for method in args.methods}
    base_macs, base_params = count_macs(model), count_params(model)
    print(f"ResNet-56, {len(test)} test images, {args.images} calibration images, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'scorer':<6} {'allocation':<11} {'recovery':<11} {'top-1':>6} {'MACs -%':>7} {'params -%':>9} "
          f"{'time s':>7}", flush=True)
    rows = []
    for name in args.scorers:
        scorer = get_scorer(name)
        images = train.sample(args.collect_images, args.seed)
        key = content_key(model, sets, images)
        needs = set().union(*(spec.method.requests() for spec in specs.values()))
        stats = collect_stage(model, sets, images, [set(scorer.requests()), needs], CollectSpec(len(images)), ctx,
                              key=key, device=args.device, progress=args.progress)
        orders, orders_key = score_stage(model, sets, stats, scorer, ctx, key=key)
        for allocation in args.allocation:
            plan = PlanSpec(target_macs_reduction=TARGET, allocation=allocation,
                            sensitivity_images=SENSITIVITY_IMAGES)
            removed = plan_stage(model, sets, orders, stats, plan, get_recovery("none").method, ctx, example,
                                 orders_key=orders_key, device=args.device, progress=args.progress,
                                 held_out=lambda: train.held_out(SENSITIVITY_IMAGES, args.seed))["removed"]
            for method, spec in specs.items():
                start = time.perf_counter()
                repaired, status = prune_and_recover(model, sets, orders, stats, removed, spec, train, ctx, example,
                                                     rescore=no_rescore, seed=args.seed, device=args.device,
                                                     progress=args.progress)
                seconds = time.perf_counter() - start
                skipped = {k: str(v) for k, v in status.items() if not v.done}
                if skipped:
                    print(f"  {method}: skipped {skipped}")
                top1, _ = accuracy(repaired.eval(), test, device=args.device)
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
