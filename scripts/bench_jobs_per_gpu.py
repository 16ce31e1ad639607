"""Aggregate fine-tuning throughput of N jobs of one sweep sharing one GPU (hydra/launcher=gpu_shared).

For each N, one ``qsfm-run -m`` sweep of N jobs (seeds 0..N-1: the same work each) fine-tunes a pruned ResNet-56
for one epoch on synthetic CIFAR-shaped data; throughput is the images all jobs trained divided by the longest
job's training time (the jobs run concurrently, so their epochs overlap). Prints images/s per N and the gain
over one job.

    python scripts/bench_jobs_per_gpu.py --jobs 1 2 4 8          # on a GPU machine
    python scripts/bench_jobs_per_gpu.py --jobs 1 2 --dry        # toy sizes on the CPU
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qsfm_cli.models import create_model


def sweep(n: int, args: argparse.Namespace, work: Path, checkpoint: Path) -> float:
    """Images/s of all ``n`` jobs together."""
    out = work / f"jobs{n}"
    seeds = ",".join(str(s) for s in range(n))
    command = [sys.executable, "-m", "qsfm_cli.app", "-m", "hydra/launcher=gpu_shared", f"hydra.launcher.n_jobs={n}",
               f"model={args.model}", f"model.checkpoint={checkpoint}", "dataset=fake",
               f"dataset.train_size={args.images}", "dataset.test_size=256", "prune.ratio=0.5",
               "finetune=short", "finetune.epochs=1", f"finetune.batch_size={args.batch}", "collect.num_images=64",
               "eval.latency_repeats=3", "eval.latency_batches=[1]", f"device={args.device}", "progress=false",
               f"seed={seeds}", f"hydra.sweep.dir={out}", f"cache.dir={work / 'cache'}"]
    proc = subprocess.run(command, capture_output=True, text=True)
    logs = sorted(out.glob("*/train_log.csv"))
    if proc.returncode != 0 or len(logs) != n:
        sys.exit(f"sweep of {n} jobs failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    seconds = [float(next(csv.DictReader(log.open()))["seconds"]) for log in logs]
    trained = n * (args.images // args.batch) * args.batch
    return trained / max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="ResNet-20 on 256 images: checks the plumbing only")
    args = parser.parse_args()
    args.model, args.images, args.batch = ("resnet20", 256, 64) if args.dry else ("resnet56", 50_000, 256)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / "untrained.pt"
        torch.manual_seed(0)
        torch.save(create_model(args.model).state_dict(), checkpoint)
        rates = {n: sweep(n, args, work, checkpoint) for n in args.jobs}
    print(f"{args.model}, {args.images} synthetic images, batch {args.batch}, one epoch per job, device {args.device}")
    for n, rate in rates.items():
        print(f"{n} job(s) at once: {rate:9.0f} img/s  (x{rate / rates[args.jobs[0]]:.2f})")
    print("aggregate: " + ", ".join(f"{n} jobs {rate:.0f} img/s" for n, rate in rates.items()))


if __name__ == "__main__":
    main()
