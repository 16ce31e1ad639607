"""Deployment latency of pruned models: speed-up next to the MACs factor, per runtime and channel rounding.

    python scripts/bench_deploy.py                               # every case, rounding none / 8 / 16
    python scripts/bench_deploy.py --cases resnet56:0.5 --round 0 8 --repeats 10 --json bench.json
    python scripts/bench_deploy.py --cases resnet56:0.7 --scope stage     # residual streams cut too

Untrained models in eval mode on random 32x32 inputs (speed does not depend on the weights): CIFAR
ResNet-56 at ratio 0.3 / 0.5 / 0.7, VGG-16-BN and MobileNetV2 at 0.5, each default channel set cut by that
ratio in ascending L1 norm of its filters. With ``--round M`` each set's kept count is then rounded to the
nearest multiple of M (at least M, at most the set's size; a set of at most M channels stays as cut):
vectorized kernels work in blocks of 8 or 16 channels, so a ragged width pays for a full block. A
rounding that keeps the same channels as an earlier one is listed, not measured again. Each base/pruned
pair is timed in alternation (``qsfm_cli.latency.measure_pair``) in eager PyTorch and in ONNX Runtime's
CPU provider, each with 1 thread and with all threads, at batch 1 and 64. ``(x)?`` marks an untrusted
speed-up (a spread above the limit); the last column lists the runtimes whose batch-64 speed-up reaches
0.8 of the MACs factor.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from qsfm_cli.counting import count_macs
from qsfm_cli.latency import MAX_SPREAD, PairLatency, measure_pair
from qsfm_cli.models import create_model
from qsfm_cli.files import write_json
from qsfm_cli.plan import keep_from_counts, removed_count
from qsfm_cli.pruning import SCOPES, apply_keep, channel_sets
from qsfm_cli.scoring import get_scorer

CASES = ["resnet56:0.3", "resnet56:0.5", "resnet56:0.7", "vgg16_bn:0.5", "mobilenetv2:0.5"]
GOAL = 0.8      # speed-up at batch 64 over the MACs factor that a deployable pruning should reach


def rounded(kept: int, size: int, multiple: int) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple`` (halves up), within [multiple, size]."""
    if not multiple or size <= multiple:
        return kept
    return min(size, max(multiple, multiple * math.floor(kept / multiple + 0.5)))


def l1_keep(model: nn.Module, ratio: float, multiple: int, scope: str) -> dict[str, list[int]]:
    sets = channel_sets(model, torch.zeros(1, 3, 32, 32), scope)
    orders = get_scorer("l1").score(model, sets, {})
    counts = {s.name: s.size - rounded(s.size - removed_count(ratio, s.size), s.size, multiple) for s in sets}
    return keep_from_counts(orders, sets, counts)


def runtimes(threads: int) -> list[tuple[str, str, int | None]]:
    """(column label, runtime, threads) of each measured setting."""
    return [(f"{label} {n}T", runtime, n) for label, runtime in (("torch", "torch"), ("onnxruntime", "onnxruntime"))
            for n in dict.fromkeys((1, threads))]


def measure(model: nn.Module, pruned: nn.Module, args: argparse.Namespace) -> dict[str, list[PairLatency]]:
    found = {}
    for label, runtime, threads in runtimes(args.threads):
        found[label] = [pair for batch, repeats in ((1, args.repeats), (64, args.repeats_b64))
                        for pair in measure_pair(model, pruned, [batch], runtime=runtime, threads=threads,
                                                 repeats=repeats, warmup=2, min_warmup_s=0.3)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, help="model:ratio pairs (default: %(default)s)")
    parser.add_argument("--round", nargs="+", type=int, default=[0, 8, 16], dest="multiples",
                        help="round kept counts to these multiples; 0 = no rounding (default: 0 8 16)")
    parser.add_argument("--scope", default="default", choices=SCOPES,
                        help="channel sets cut (prune.scope; 'stage' adds the residual streams)")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per model at batch 1")
    parser.add_argument("--repeats-b64", type=int, default=7, help="timed passes per model at batch 64")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="'all threads' (default: torch's default, %(default)s)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args()
    cases = []
    for case in args.cases:
        name, _, ratio = case.partition(":")
        try:
            cases.append((name, float(ratio)))
        except ValueError:
            parser.error(f"--cases takes model:ratio, e.g. resnet56:0.5; got {case!r}")
    if any(m < 0 for m in args.multiples):
        parser.error(f"--round takes multiples >= 0; got {args.multiples}")

    labels = [label for label, _, _ in runtimes(args.threads)]
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, scope {args.scope}, repeats {args.repeats} (b1) / "
          f"{args.repeats_b64} (b64), (x)? = untrusted (IQR / median above {MAX_SPREAD:g}); speed-up at b1 / b64\n")
    print("| model | ratio | round | MACs (M) | MACs x | " + " | ".join(labels) + f" | b64 >= {GOAL} MACs x |")
    print("|---|---|---|---|---|" + "---|" * len(labels) + "---|")
    records = []
    for name, ratio in cases:
        torch.manual_seed(0)
        model = create_model(name).eval()
        base_macs = count_macs(model)
        seen: dict[str, int] = {}
        for multiple in args.multiples:
            keep = l1_keep(model, ratio, multiple, args.scope)
            same = seen.setdefault(repr(keep), multiple)
            if same != multiple:
                print(f"| {name} | {ratio} | {multiple or '-'} | same channels as round {same or '-'} |", flush=True)
                continue
            started = time.perf_counter()
            pruned = apply_keep(model, keep, torch.zeros(1, 3, 32, 32)).eval()
            macs = count_macs(pruned)
            factor = base_macs / macs
            found = measure(model, pruned, args)
            reached = [label for label, (_, b64) in found.items() if b64.trusted and b64.speedup >= GOAL * factor]
            cells = [f"{b1.speedup_text()} / {b64.speedup_text()}" for b1, b64 in found.values()]
            print(f"| {name} | {ratio} | {multiple or '-'} | {macs / 1e6:.1f} | {factor:.2f} | " + " | ".join(cells)
                  + f" | {', '.join(reached) or 'none'} |", flush=True)
            records.append({"model": name, "ratio": ratio, "scope": args.scope, "round": multiple,
                            "base_macs": base_macs, "macs": macs, "macs_factor": factor,
                            "seconds": time.perf_counter() - started,
                            "latency": {label: [p.to_dict() for p in pairs] for label, pairs in found.items()}})
            if args.json:
                write_json(args.json, records)


if __name__ == "__main__":
    main()
