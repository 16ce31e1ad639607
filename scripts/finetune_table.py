"""docs/finetune.md's table from the runs of scripts/finetune_table.sh.

    python scripts/finetune_table.py SWEEP_DIR

Per scorer and recovery: test top-1 right after pruning (the run without recovery, same plan), after the
recovery, after each fine-tuning epoch (train_log.csv) and at the end (fp32, all test images).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from qsfm_cli.record import RunRecord
from qsfm_cli.report import find_run_dirs, read_record
from qsfm_cli.train import LOG_FILE


def main(sweep: Path) -> None:
    runs = [(d, read_record(d)) for d in find_run_dirs([sweep])]
    runs = [(d, r) for d, r in runs if isinstance(r, RunRecord) and r.status == "ok"]
    if not runs:
        sys.exit(f"finetune_table.py: no finished run under {sweep}")
    raw = {r.settings.scorer["name"]: r.results.pruned.top1 for _, r in runs if r.settings.recovery == "none"}
    epochs = max(r.settings.finetune["epochs"] for _, r in runs)
    print("| scorer | recovery | MACs -% | pruned | recovered | "
          + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " | final |")
    print("|---|---|---|---|---|" + "---|" * epochs + "---|")
    for run_dir, r in sorted(runs, key=lambda x: (x[1].settings.scorer["name"], x[1].settings.recovery != "none")):
        scorer = r.settings.scorer["name"]
        with open(run_dir / LOG_FILE, newline="") as f:
            per_epoch = [row["test_top1"] for row in csv.DictReader(f)]
        per_epoch += ["-"] * (epochs - len(per_epoch))
        macs = 100 * (1 - r.results.final.macs / r.results.base.macs)
        recovered = f"{r.results.pruned.top1:.2f}" if r.settings.recovery != "none" else "-"
        print(f"| {scorer} | {r.settings.recovery} | {macs:.2f} | {raw.get(scorer, float('nan')):.2f} | {recovered} | "
              + " | ".join(per_epoch) + f" | {r.results.final.top1:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, metavar="SWEEP_DIR",
                        help="the sweep directory scripts/finetune_table.sh wrote (OUT_DIR/runs)")
    sweep = parser.parse_args().sweep
    if not sweep.is_dir():
        parser.error(f"SWEEP_DIR={sweep}; accepted: an existing directory")
    main(sweep)
