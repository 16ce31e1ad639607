"""The markdown tables of docs/recovery.md from the run directories scripts/recovery_table.sh wrote.

    python scripts/recovery_table.py OUT_DIR

First table: top-1 (all test images) per scorer and recovery at one MACs target, with the wall time of the
recover stage; second: every run of OUT_DIR/best (the best recipe at several targets).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qsfm_cli.record import RunRecord
from qsfm_cli.report import find_run_dirs, read_record

RECOVERIES = ("none", "lstsq+bn", "sequential", "blockwise")


def finished(root: Path) -> list[RunRecord]:
    records = [read_record(d) for d in find_run_dirs([root])] if root.is_dir() else []
    return [r for r in records if isinstance(r, RunRecord) and r.status == "ok"]


def reduction(record: RunRecord, field: str) -> float:
    base, final = record.results.base, record.results.final
    return 100 * (1 - getattr(final, field) / getattr(base, field))


def cell(record: RunRecord) -> str:
    seconds = record.timings_s.get("recover", 0.0)
    return f"{record.results.final.top1:.2f}" + (f" ({seconds:.0f} s)" if record.settings.recovery != "none" else "")


def scorer_table(records: list[RunRecord]) -> str:
    by = {(r.settings.scorer["name"], r.settings.recovery): r for r in records}
    scorers = list(dict.fromkeys(r.settings.scorer["name"] for r in records))
    lines = ["| scorer | MACs -% | params -% | " + " | ".join(RECOVERIES) + " |",
             "|---|---|---|" + "---|" * len(RECOVERIES)]
    for scorer in scorers:
        any_run = next(r for (s, _), r in by.items() if s == scorer)
        cells = [cell(by[scorer, rec]) if (scorer, rec) in by else "pending" for rec in RECOVERIES]
        lines.append(f"| {scorer} | {reduction(any_run, 'macs'):.2f} | {reduction(any_run, 'params'):.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_table(records: list[RunRecord]) -> str:
    lines = ["| scorer | plan | recovery | MACs -% | params -% | top-1 | drop | recover s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r.settings.prune["target_macs_reduction"]):
        lines.append(f"| {r.settings.scorer['name']} | {r.settings.prune['allocation']} "
                     f"{100 * r.settings.prune['target_macs_reduction']:.2f}% | {r.settings.recovery} | "
                     f"{reduction(r, 'macs'):.2f} | {reduction(r, 'params'):.2f} | {r.results.final.top1:.2f} | "
                     f"{r.results.base.top1 - r.results.final.top1:.2f} | {r.timings_s.get('recover', 0):.0f} |")
    return "\n".join(lines)


def main(out: Path) -> None:
    table = finished(out / "table") + finished(out / "table_lstsq")
    if not table:
        sys.exit(f"recovery_table.py: no finished run under {out}/table; run scripts/recovery_table.sh first")
    first = table[0]
    print(f"Top-1 (%) on {first.settings.dataset['name']} test images, {first.settings.model['name']}, one uniform "
          f"ratio at -{100 * first.settings.prune['target_macs_reduction']:.2f}% MACs, no fine-tuning; in "
          f"brackets the wall time of the recover stage.\n")
    print(scorer_table(table))
    best = finished(out / "best")
    if best:
        print("\nThe best recipe (experiment=qsfm_resnet56_posttrain) at other targets:\n")
        print(best_table(best))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="the OUT_DIR of scripts/recovery_table.sh")
    out = parser.parse_args().out
    if not out.is_dir():
        parser.error(f"OUT_DIR={out}; accepted: an existing directory")
    main(out)
