"""Do physically pruned models run faster? Latency speedup next to the MACs reduction factor.

    python scripts/bench_prune.py                       # CPU, ResNet-56 at 0.3/0.5/0.7, MobileNetV2 at 0.5
    python scripts/bench_prune.py --device cuda --threads 0
    python scripts/bench_prune.py --rows                # also the published rows' MACs/params

Channels are removed from each model's default sets (ResNet block-internal, MobileNetV2 hidden channels) in
ascending L1 norm of their filters: the architecture's speed is measured, not a scorer. Latency is the
median of ``--repeats`` timed forward passes (after warm-up) of an untrained model in eval mode on random
32x32 inputs, batch 1 and batch 64; the unpruned and pruned models are timed alternately, round after
round, so that a busy machine slows both alike (``qsfm_cli.latency.measure_pair``). A speed-up printed
as ``(x)?`` is untrusted: one model's timings spread more than the limit (IQR / median).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.latency import MAX_SPREAD, measure_pair
from qsfm_cli.models import create_model
from qsfm_cli.plan import PlanSpec, make_keep
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.papers import conv_linear_params, reference, thop_flops
from qsfm_cli.scoring import get_scorer

CASES = [("resnet56", 0.3), ("resnet56", 0.5), ("resnet56", 0.7), ("mobilenetv2", 0.5)]
EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"
ROWS = ("hrank_resnet56", "chip_resnet56_a", "chip_resnet56_b", "chip_resnet110")


def row_setting(name: str) -> tuple[str, PlanSpec, str]:
    """(model, plan, reference key) of an experiment config: its model override and prune.rates/scope."""
    cfg = OmegaConf.load(EXPERIMENTS / f"{name}.yaml")
    model = next(entry["override /model"] for entry in cfg.defaults
                 if OmegaConf.is_dict(entry) and "override /model" in entry)
    return model, PlanSpec(rates=cfg.prune.rates, scope=cfg.prune.scope), cfg.reference


def pruned_copy(model: nn.Module, x: torch.Tensor, plan: PlanSpec) -> nn.Module:
    sets = channel_sets(model, x, plan.scope)
    scorer = get_scorer("l1")
    plan.validate(sets, model, scorer=scorer)
    keep, _ = make_keep(scorer.score(model, sets, {}), sets, plan, model=model, example_input=x)
    return apply_keep(model, keep, x).eval()


def bench(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats} repeats, "
          f"(x)? = untrusted (IQR / median above {MAX_SPREAD:g})")
    print(f"{'model':<12} {'ratio':>5} {'MACs M':>15} {'MACs x':>7} {'params M':>13} "
          f"{'b1 ms':>15} {'b1 x':>7} {'b64 ms':>17} {'b64 x':>7}")
    x = torch.zeros(1, 3, 32, 32)
    for name, ratio in CASES:
        torch.manual_seed(0)
        model = create_model(name).eval()
        pruned = pruned_copy(model, x, PlanSpec(ratio=ratio))
        macs = count_macs(model), count_macs(pruned)
        params = count_params(model), count_params(pruned)
        model, pruned = model.to(device), pruned.to(device)
        [b1] = measure_pair(model, pruned, [1], device=device, repeats=args.repeats)
        [b64] = measure_pair(model, pruned, [64], device=device, repeats=max(5, args.repeats // 3))
        print(f"{name:<12} {ratio:>5} {macs[0] / 1e6:>7.2f}>{macs[1] / 1e6:<7.2f} {macs[0] / macs[1]:>7.2f} "
              f"{params[0] / 1e6:>6.3f}>{params[1] / 1e6:<6.3f} {b1.base_ms:>7.2f}>{b1.pruned_ms:<7.2f} "
              f"{b1.speedup_text():>7} {b64.base_ms:>8.2f}>{b64.pruned_ms:<8.2f} {b64.speedup_text():>7}")


def rows() -> None:
    """Our counts of the published rows' networks beside the papers' figures."""
    print(f"\n{'row':<19} {'ours MACs M':>11} {'params M':>8} {'w/o BN':>7} {'thop FLOPs M':>12} {'paper':>14}")
    x = torch.zeros(1, 3, 32, 32)
    for row in ROWS:
        name, plan, key = row_setting(row)
        paper = reference(key)
        model = create_model(name).eval()
        pruned = pruned_copy(model, x, plan)
        macs, thop, no_bn = count_macs(pruned), thop_flops(pruned), conv_linear_params(pruned)
        print(f"{row:<19} {macs / 1e6:>11.2f} {count_params(pruned) / 1e6:>8.4f} {no_bn / 1e6:>7.4f} "
              f"{thop / 1e6:>12.2f} {paper.macs_M:>7.2f}/{paper.params_M:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--rows", action="store_true", help="also count the published rows' networks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench(args)
    if args.rows:
        rows()


if __name__ == "__main__":
    main()
