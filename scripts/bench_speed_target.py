"""Every figure of docs/speed.md, in one command that prints one markdown document.

    python scripts/bench_speed_target.py --data ../shared/data \
        --checkpoint ../shared/checkpoints/resnet56-4bfd9763.th [--quick] [--out DIR] [--recover lstsq]

On ONNX Runtime, 1 intra-op thread (``--threads``), CPU:
1. the time to build ResNet-56's latency table at batch 64 and 1;
2. the whole-network prediction error on random plans (random kept widths per set), for both predictors,
   against base and pruned timed in alternation (``latency.measure_pair``; untrusted pairs are marked and
   left out of the summary), for plans on the table's grid widths and for plans of any widths;
3. ResNet-56 (the shared checkpoint, CIFAR-10, all test images): ``prune.target_speedup`` 1.5/2/2.5 at batch
   64 and 1.5/2 at batch 1 (sensitivity allocation), beside the MACs-targeted sensitivity plan removing
   1 - 1/target of the MACs, same scorer and recovery; MACs and params reductions, predicted and measured
   speed-up, top-1;
4. VGG-16-BN and MobileNetV2, untrained (speed does not depend on the weights): the 2x target at batch 64
   (uniform allocation);
5. int8: the ResNet-56 2x plan (batch 64) exported and quantized by ONNX Runtime, calibrated on 256 unlabeled
   training images: top-1 beside fp32, speed-up over the unpruned fp32 model;
6. on a CUDA GPU, when there is one: the 2x target in eager PyTorch at batch 256 (else "pending").

``--sections`` runs a part of these (``table`` is 1 and 2, ``targets`` 3, then ``untrained``, ``int8``, ``cuda``).
``--quick`` runs a functional check in minutes (1 random plan of each kind, the 2x target at batch 64 only, fewer
repeats): its figures are not results. Timings are only results on a quiet machine: the document says
the load average it ran under.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from qsfm_cli import latency_table as lt
from qsfm_cli.latency import measure_pair
from qsfm_cli.models import create_model
from qsfm_cli.plan import PlanSpec, make_keep
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.types import Order

X = torch.zeros(1, 3, 32, 32)
SECTIONS = ("table", "targets", "untrained", "int8", "cuda")


def load_average() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def table_build(model, threads: int, batches: list[int], repeats: int) -> tuple[list[str], dict]:
    rows = ["| model | runtime | batch | threads | layer and block shapes timed | build s | unpruned ms |", "|---|---|---|---|---|---|---|"]
    sets = channel_sets(model, X)
    tables = {}
    for batch in batches:
        started = time.perf_counter()
        table = lt.build_table(model, X, sets, runtime="onnxruntime", batch=batch, threads=threads, repeats=repeats)
        seconds = time.perf_counter() - started
        tables[batch] = table
        rows.append(f"| resnet56 | onnxruntime | {batch} | {threads} | {table['timed_shapes']} | {seconds:.1f} | "
                    f"{table['base_ms']:.2f} |")
    return rows, tables


def random_plans(model, table, plans: int, threads: int, repeats: int, seed: int = 0) -> list[str]:
    """``plans`` random plans whose widths are on the table's grid (what the planner chooses from), then
    ``plans`` with any widths (ragged ones included, which the table only interpolates)."""
    sets = channel_sets(model, X)
    rng = random.Random(seed)
    rows = ["| plan | widths | kept channels (of " + str(sum(s.size for s in sets)) + ") | predicted (product) | "
            "predicted (additive) | measured | error product | error additive |", "|---|---|---|---|---|---|---|---|"]
    errors = {(kind, p): [] for kind in ("grid", "any") for p in lt.PREDICTORS}
    for i in range(2 * plans):
        kind = "grid" if i < plans else "any"
        fraction = rng.uniform(0.2, 0.9)
        kept = {s.name: max(1, min(s.size, round(s.size * rng.uniform(fraction - 0.2, fraction + 0.2))))
                for s in sets}
        if kind == "grid":
            kept = {s.name: min(lt.grid_widths(s.size), key=lambda w: abs(w - k)) for s, k in zip(sets, kept.values())}
        pruned = apply_keep(model, {n: list(range(k)) for n, k in kept.items()}, X)
        [pair] = measure_pair(model, pruned, [table["batch"]], runtime="onnxruntime", threads=threads,
                              repeats=repeats)
        predicted = {p: lt.predicted_speedup(table, kept, p) for p in lt.PREDICTORS}
        error = {p: predicted[p] / pair.speedup - 1 for p in lt.PREDICTORS}
        if pair.trusted:
            for p in lt.PREDICTORS:
                errors[kind, p].append(abs(error[p]))
        rows.append(f"| {i + 1} | {kind} | {sum(kept.values())} | {predicted['product']:.2f} | "
                    f"{predicted['additive']:.2f} | {pair.speedup_text()} | {100 * error['product']:+.1f}% | "
                    f"{100 * error['additive']:+.1f}% |")
    rows.append("")
    for (kind, p), found in errors.items():
        if found:
            rows.append(f"- {kind} widths, {p}: mean |error| {100 * sum(found) / len(found):.1f}%, max "
                        f"{100 * max(found):.1f}% over {len(found)} trusted plan(s)")
    return rows


def resnet56_targets(args, cases: list[tuple[int, float]], out: Path) -> tuple[list[str], dict]:
    from hydra import compose, initialize_config_dir

    from qsfm_cli.app import build_experiment, config_dir
    from qsfm_cli.checkpoints import load_weights
    from qsfm_cli.outputs import load_pruned
    from qsfm_cli.pipeline import run_experiment

    common = ["model=resnet56", f"model.checkpoint={args.checkpoint}", "dataset=cifar10",
              f"dataset.root={args.data}", "progress=false", f"cache.dir={out / 'cache'}", "eval.latency_batches=[]",
              f"scorer={args.scorer}", f"recover={args.recover}", f"prune.latency_threads={args.threads}",
              f"prune.latency_repeats={args.repeats}"]

    def experiment(name: str, *overrides: str):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[*common, *overrides])
        return build_experiment(cfg, out / name)

    rows = ["| batch | target | plan | MACs -% | params -% | predicted speed-up | measured speed-up | met (>= 0.95 x) "
            "| top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    base = None
    runs = {}
    for batch, target in cases:
        scope = []
        try:
            speed = run_experiment(experiment(f"speed_b{batch}_{target}", "prune=speed",
                                              f"prune.target_speedup={target}", f"prune.latency_batch={batch}"))
        except ValueError as refused:     # beyond the block-internal sets: the residual streams too
            rows.append(f"| {batch} | {target:g}x | speed-up target (sensitivity), block-internal sets | "
                        f"refused: {refused} |||||||")
            scope = ["prune.scope=all"]
            speed = run_experiment(experiment(f"speed_b{batch}_{target}_all", "prune=speed", *scope,
                                              f"prune.target_speedup={target}", f"prune.latency_batch={batch}"))
        macs = run_experiment(experiment(f"macs_b{batch}_{target}{'_all' if scope else ''}", "prune=sensitivity",
                                         *scope, f"prune.target_macs_reduction={1 - 1 / target:.4f}"))
        if base is None:
            base = load_weights(create_model("resnet56"), args.checkpoint).eval()
        pruned = load_pruned(out / f"macs_b{batch}_{target}{'_all' if scope else ''}" / "pruned_model.pt")
        [pair] = measure_pair(base, pruned, [batch], runtime="onnxruntime", threads=args.threads,
                              repeats=max(args.repeats, 10))
        runs[batch, target] = speed
        where = ", residual streams too (scope all)" if scope else ""
        for name, record, measured, predicted in (
                (f"speed-up target (sensitivity{where})", speed, speed.results.speed,
                 speed.results.speed["predicted_speedup"]),
                (f"MACs target -{100 * (1 - 1 / target):.1f}% (sensitivity{where})", macs,
                 {"measured_speedup": pair.speedup, "trusted": pair.trusted}, None)):
            b, f = record.results.base, record.results.final
            shown = f"{measured['measured_speedup']:.2f}" if measured["trusted"] else f"({measured['measured_speedup']:.2f})?"
            met = ("yes" if measured["measured_speedup"] >= 0.95 * target else "no") if measured["trusted"] else "?"
            rows.append(f"| {batch} | {target:g}x | {name} | {100 * (1 - f.macs / b.macs):.2f} | "
                        f"{100 * (1 - f.params / b.params):.2f} | {'-' if predicted is None else f'{predicted:.2f}'} | "
                        f"{shown} | {met} | {f.top1:.2f} |")
    return rows, {"runs": runs, "base": base, "experiment": experiment}


def untrained_targets(threads: int, repeats: int, names: list[str], device: str = "cpu", runtime: str = "onnxruntime",
                      batch: int = 64) -> list[str]:
    rows = [f"| model | runtime | batch | target | predicted | measured | met (>= 0.95 x) | table build s |",
            "|---|---|---|---|---|---|---|---|"]
    for name in names:
        model = create_model(name).eval().to(device)
        example = X.to(device)
        sets = channel_sets(model, example)
        table = lt.build_table(model, example, sets, runtime=runtime, batch=batch, threads=threads, repeats=repeats,
                               device=device)
        orders = {s.name: Order(removal=list(range(s.size))) for s in sets}
        spec = PlanSpec(target_speedup=2.0, latency_runtime=runtime, latency_batch=batch, latency_threads=threads)
        keep, info = make_keep(orders, sets, spec, model=model, example_input=example, prepared=table)
        pruned = apply_keep(model, keep, example)
        [pair] = measure_pair(model, pruned, [batch], runtime=runtime, device=device, threads=threads,
                              repeats=max(repeats, 10))
        met = ("yes" if pair.speedup >= 0.95 * 2.0 else "no") if pair.trusted else "?"
        rows.append(f"| {name} | {runtime} | {batch} | 2x | {info['predicted_speedup']:.2f} | {pair.speedup_text()} | "
                    f"{met} | {table['build_s']:.1f} |")
    return rows


def int8_row(args, ctx: dict, out: Path) -> list[str]:
    from qsfm_cli.export import export_onnx, onnx_accuracy, quantize_int8
    from qsfm_cli.latency import onnx_pair_latency
    from qsfm_cli.loaders import make_loader
    from qsfm_cli.outputs import load_pruned

    exp = ctx["experiment"]("int8")
    record = ctx["runs"].get((64, 2.0))
    pruned = load_pruned(out / "speed_b64_2.0" / "pruned_model.pt")
    images = exp.train_set.sample(256, exp.seed)
    fp32 = export_onnx(pruned, out / "pruned.onnx", X)
    base = export_onnx(ctx["base"], out / "base.onnx", X)
    int8 = quantize_int8(fp32, out / "pruned.int8.onnx",
                         (x for x, _ in make_loader(images, 64, device="cpu", train=False, num_workers=0)))

    def test():
        return make_loader(exp.test_set, 500, device="cpu", train=False, num_workers=0)

    top1 = {"fp32": onnx_accuracy(fp32, test()), "int8": onnx_accuracy(int8, test())}
    over_base = onnx_pair_latency(base, int8, 64, input_shape=(3, 32, 32), threads=args.threads,
                                  repeats=max(args.repeats, 10))
    over_fp32 = onnx_pair_latency(fp32, int8, 64, input_shape=(3, 32, 32), threads=args.threads,
                                  repeats=max(args.repeats, 10))
    return ["| model | top-1 fp32 pruned | top-1 int8 pruned | int8 - fp32 (pp) | int8 speed-up over unpruned fp32 | "
            "over pruned fp32 | size fp32 / int8 (MB) |", "|---|---|---|---|---|---|---|",
            f"| ResNet-56, 2x plan (b64){'' if record else ' (run missing)'} | {top1['fp32']:.2f} | {top1['int8']:.2f} | "
            f"{top1['int8'] - top1['fp32']:+.2f} | {over_base.speedup_text()} | {over_fp32.speedup_text()} | "
            f"{fp32.stat().st_size / 1e6:.2f} / {int8.stat().st_size / 1e6:.2f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the folder holding cifar-10-batches-py")
    parser.add_argument("--checkpoint", required=True, help="ResNet-56 CIFAR-10 weights")
    parser.add_argument("--quick", action="store_true", help="a functional check in minutes: not results")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timings per measurement (default 10, quick 5)")
    parser.add_argument("--plans", type=int, default=None, help="random plans of each kind (default 10, quick 1)")
    parser.add_argument("--scorer", default="l1")
    parser.add_argument("--recover", default="lstsq", help="recovery of both planners (blockwise: slower)")
    parser.add_argument("--cases", default="64:1.5,64:2,64:2.5,1:1.5,1:2",
                        help="the targets section's batch:target pairs (--quick: 64:2)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which parts to run, comma-separated (default: all of {', '.join(SECTIONS)})")
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or ("int8" in sections and "targets" not in sections):
        parser.error(f"--sections={args.sections}; accepted: any of {', '.join(SECTIONS)} (int8 needs targets)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("qsfm_cli").setLevel(logging.INFO)     # progress on stderr; the document on stdout
    args.repeats = args.repeats or (5 if args.quick else 10)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_speed_"))
    started, load_before = time.perf_counter(), load_average()
    print(f"# Speed-up targets on ONNX Runtime ({'--quick: a functional check, not results' if args.quick else 'results'})\n")
    print(f"torch {torch.__version__}, {lt.machine()}, {args.threads} thread(s), {args.repeats} repeats; load average "
          f"before: {load_before}\n")
    resnet56 = create_model("resnet56").eval()
    if "table" in sections:
        rows, tables = table_build(resnet56, args.threads, [64] if args.quick else [64, 1], args.repeats)
        print("## Latency table build\n\n" + "\n".join(rows) + "\n", flush=True)
        rows = random_plans(resnet56, tables[64], args.plans or (1 if args.quick else 10), args.threads, args.repeats)
        print("## Prediction error on random plans (batch 64)\n\n" + "\n".join(rows) + "\n", flush=True)
    if "targets" in sections:
        cases = [(64, 2.0)] if args.quick else [(int(b), float(t)) for b, t in
                                                 (case.split(":") for case in args.cases.split(","))]
        rows, ctx = resnet56_targets(args, cases, out)
        print(f"## ResNet-56 on CIFAR-10: speed-up targets (scorer {args.scorer}, recover {args.recover})\n\n"
              + "\n".join(rows) + "\n", flush=True)
    if "untrained" in sections:
        rows = untrained_targets(args.threads, args.repeats, ["vgg16_bn", "mobilenetv2"])
        print("## Untrained VGG-16-BN and MobileNetV2: 2x at batch 64\n\n" + "\n".join(rows) + "\n", flush=True)
    if "int8" in sections:
        print("## int8 after pruning (ONNX Runtime static quantization, batch 64)\n\n"
              + "\n".join(int8_row(args, ctx, out)) + "\n", flush=True)
    if "cuda" in sections and torch.cuda.is_available():
        rows = untrained_targets(args.threads, args.repeats, ["resnet56"], device="cuda", runtime="torch", batch=256)
        print("## CUDA eager, batch 256 (untrained ResNet-56)\n\n" + "\n".join(rows) + "\n")
    elif "cuda" in sections:
        print("## CUDA eager, batch 256\n\npending: no GPU on this machine.\n")
    print(f"Total {time.perf_counter() - started:.0f} s; load average before {load_before}, after {load_average()}; "
          f"runs in {out}.")


if __name__ == "__main__":
    main()
