"""Which result tables of the README and docs/ may no longer hold on the current code.

    python scripts/check_docs.py                                      # every table of figures, the script
                                                                      # that regenerates it, stale marks
    python scripts/check_docs.py --rerun --data DIR --checkpoint FILE [--cache DIR]
                                                                      # also re-run each table's probe cells

A table of figures (two or more cells holding a decimal number) must name, in its section (from the
heading above it to the table's end), the script in scripts/ (or the qsfm-run command) that regenerates it;
a table without one is listed. A table of configuration values is marked, before it,
``<!-- settings, not measurements -->``. A section marked "stale: pending regeneration" is listed with its mark. A table may declare cells
to probe, in an HTML comment before it:

    <!-- check: ROW | COLUMN | qsfm-run overrides -->

(ROW: the first cell of the row, COLUMN: the header cell, the overrides: one run of ``experiment=scorer_table``
that gives the cell's final top-1). ``--rerun`` runs each probe on DIR/CHECKPOINT (ResNet-56 on CIFAR-10)
and lists the cells whose value the current code no longer gives. Exit status 1 when anything is listed.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"^\**\(?-?\d+\.\d+")          # a number, marked or not
SCRIPT = re.compile(r"scripts/[\w./-]+\.(?:sh|py)")
PROBE = re.compile(r"<!--\s*check:\s*(.+?)\s*\|\s*(.+?)\s*\|\s*(.+?)\s*-->")
STALE = "stale: pending regeneration"
SETTINGS = "<!-- settings, not measurements -->"     # before a table of configuration values


@dataclass
class Table:
    doc: Path
    line: int                      # 1-based line of the header row
    header: list[str]
    rows: list[list[str]]
    scripts: list[str]
    stale: bool
    probes: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def figures(self) -> int:
        return sum(bool(FIGURE.match(cell)) for row in self.rows for cell in row)

    def cell(self, row: str, column: str) -> str | None:
        if column not in self.header:
            return None
        index = self.header.index(column)
        return next((r[index] for r in self.rows if r and r[0].strip("`*") == row and index < len(r)), None)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(doc: Path) -> list[Table]:
    """Every markdown table of ``doc`` with its section's scripts, stale mark and probes."""
    lines = doc.read_text().splitlines()
    found, section_start, i, fenced, last_end = [], 0, 0, False, 0
    while i < len(lines):
        fenced ^= lines[i].startswith("```")
        if lines[i].startswith("#") and not fenced:
            section_start = i
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            end = i + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            section = "\n".join(lines[section_start:end])
            if SETTINGS not in "\n".join(lines[section_start:i]):
                regenerate = set(SCRIPT.findall(section)) - {"scripts/check_docs.py"}
                regenerate |= {"a qsfm-run command"} if re.search(r"^(?:\s*)qsfm-run ", section, re.M) else set()
                found.append(Table(doc, i + 1, cells(lines[i]), [cells(r) for r in lines[i + 2:end]],
                                   sorted(regenerate), STALE in section,
                                   PROBE.findall("\n".join(lines[max(section_start, last_end):i]))))
            i = last_end = end
            continue
        i += 1
    return found


def rerun(probe: tuple[str, str, str], data: Path, checkpoint: Path, workdir: Path, cache: Path) -> float:
    """The final top-1 that one ``experiment=scorer_table`` run with the probe's overrides gives now."""
    run_dir = workdir / re.sub(r"[^\w.-]", "_", probe[2])
    cmd = [sys.executable, "-m", "qsfm_cli.app", "experiment=scorer_table", f"model.checkpoint={checkpoint}",
           f"dataset.root={data}", "progress=false", "eval.latency_batches=[]", f"hydra.run.dir={run_dir}",
           f"cache.dir={cache}", *probe[2].split()]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((run_dir / "metrics.json").read_text())["results"]["final"]["top1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerun", action="store_true", help="re-run every probe cell (needs --data, --checkpoint)")
    parser.add_argument("--data", type=Path, help="a folder holding cifar-10-batches-py/")
    parser.add_argument("--checkpoint", type=Path, help="resnet56-4bfd9763.th")
    parser.add_argument("--cache", type=Path, help="qsfm-run's cache.dir to share (default: a fresh one; a "
                        "cache another run of the current code filled answers from it)")
    args = parser.parse_args(argv)
    if args.rerun and not (args.data and args.checkpoint):
        parser.error("--rerun needs --data and --checkpoint")
    problems = 0
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    with tempfile.TemporaryDirectory() as tmp:
        for table in (t for doc in docs for t in tables(doc) if t.figures >= 2):
            where = f"{table.doc.relative_to(ROOT)}:{table.line}"
            if not table.scripts:
                print(f"{where}: a table of {table.figures} figures names no script in scripts/ that regenerates it")
                problems += 1
            if table.stale:
                print(f"{where}: marked '{STALE}' (regenerate with {', '.join(table.scripts) or 'its script'})")
                problems += 1
            for probe in table.probes if args.rerun else []:
                shown = table.cell(probe[0], probe[1])
                now = rerun(probe, args.data.resolve(), args.checkpoint.resolve(), Path(tmp),
                            (args.cache or Path(tmp) / "cache").resolve())
                if shown is None or shown.strip("*") != f"{now:.2f}":
                    print(f"{where}: {probe[0]} / {probe[1]} says {shown}, the current code gives {now:.2f} "
                          f"({probe[2]})")
                    problems += 1
                else:
                    print(f"{where}: {probe[0]} / {probe[1]} = {shown} reproduces")
    print(f"{problems} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
