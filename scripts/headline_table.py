"""The markdown table of docs/recovery.md's headline rows from the run directories under OUT_DIR.

    python scripts/headline_table.py OUT_DIR

One row per finished run: model, scorer, recovery label, MACs and params reductions, top-1 on all test
images, the held-out training images' top-1 and agreement with the unpruned network (what recipes are
chosen by), and the wall time of each stage (seconds; the machine's load is not recorded: say it beside).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from qsfm_cli.record import RunRecord
from qsfm_cli.report import find_run_dirs, read_record

STAGES = ("collect", "score", "plan", "prune", "recover", "distill", "evaluate", "select", "total")


def rows(root: Path) -> list[str]:
    records = [read_record(d) for d in find_run_dirs([root])]
    done = [r for r in records if isinstance(r, RunRecord) and r.status == "ok"]
    out = []
    for r in sorted(done, key=lambda r: (r.settings.model["name"], r.settings.scorer["name"])):
        res, t = r.results, r.timings_s
        base, final = res.base, res.final
        select = res.select or {}
        cells = [r.settings.model["name"], r.settings.scorer["name"], f"`{r.settings.recovery}`",
                 f"{100 * (1 - final.macs / base.macs):.2f}", f"{100 * (1 - final.params / base.params):.2f}",
                 f"{base.top1:.2f}", f"**{final.top1:.2f}**", f"{base.top1 - final.top1:.2f}",
                 f"{select.get('top1', float('nan')):.2f} / {select.get('agreement', float('nan')):.2f}",
                 " / ".join(f"{t.get(s, 0):.0f}" for s in STAGES)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(root: Path) -> None:
    print("| model | scorer | recovery | MACs -% | params -% | base top-1 | top-1 | drop | held-out train top-1 / "
          "agreement | s: " + " / ".join(STAGES) + " |")
    print("|" + "---|" * 10)
    print("\n".join(rows(root)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="the OUT_DIR of scripts/headline_table.sh")
    out = parser.parse_args().out
    if not out.is_dir():
        parser.error(f"OUT_DIR={out}; accepted: an existing directory")
    main(out)
