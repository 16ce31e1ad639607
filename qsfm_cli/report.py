"""``qsfm-report``: merge run directories into one table and a few plots.

A run is any directory holding a ``metrics.json`` (a single ``qsfm-run`` or one job of a multirun), so
the report needs no knowledge of how a sweep was launched. Plots use matplotlib's object API (no pyplot):
no global backend state, no figures left open in long sessions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .latency import MAX_SPREAD, speedup_text
from .files import atomic_write, write_text
from .outputs import METRICS_FILE, results_row
from .papers import Reference, references_for
from .record import AMOUNTS, FAILED, OK, RUNNING, RunRecord, config_columns, is_setting_column
from .scoring import list_scorers

TRAIN_LOG = "train_log.csv"
# Columns sorted on first (after them, the other setting columns in results-row order).
SORT_KEYS = ["model", "dataset", "scorer", "scorer.metric", "recovery", "prune.ratio", "prune.threshold",
             "prune.target_macs_reduction", "finetune.epochs", "seed", "run"]
MD_COLUMNS = {  # results.csv column -> results.md header
    "model": "model", "dataset": "dataset", "series": "series", "protocol": "protocol", "prune.ratio": "ratio",
    "prune.threshold": "threshold", "prune.target_macs_reduction": "MACs target", "finetune.epochs": "FT epochs",
    "seed": "seed",
    "base_top1": "base top-1", "top1_before_finetune": "top-1 pruned", "pruned_top1": "top-1 final",
    "top1_drop": "top-1 drop", "pruned_MACs_M": "MACs (M)", "MACs_reduction_%": "MACs ↓%",
    "pruned_params_M": "params (M)", "params_reduction_%": "params ↓%", "speedup_b1": "speedup b1",
    "speedup_b64": "speedup b64", "onnxruntime_speedup_b1": "onnxruntime speedup b1",
    "onnxruntime_speedup_b64": "onnxruntime speedup b64",
    "prune.target_speedup": "speed-up target", "predicted_speedup": "predicted speed-up",
    "measured_speedup": "measured speed-up",
    "time_score_s": "score s", "time_total_s": "total s",
}
# Setting columns a series label always shows in its own words (the scorer, its similarity metric, the
# recovery label, fine-tuning epochs) or that name a panel of the plot (model, dataset).
_LABELLED = {"model", "dataset", "scorer", "scorer.metric", "recovery", "recover", "recover.iterative_steps",
             "finetune.epochs"}


class ReportError(ValueError):
    """Bad input to the report (no runs found, unknown run directory)."""


# --------------------------------------------------------------------------------------------- collect

def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory at or below ``paths`` that holds a ``metrics.json``, in path order."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"no such run or sweep directory: {str(path)!r}")
        if path.is_file():
            if path.name != METRICS_FILE:
                raise ReportError(f"{str(path)!r} is neither a directory nor a {METRICS_FILE}")
            found.add(path.parent.resolve())
            continue
        found.update(m.parent.resolve() for m in path.rglob(METRICS_FILE))
    return sorted(found)


def read_record(run_dir: Path) -> RunRecord | str:
    """The run's record, or why it cannot be read (an unreadable file is a bad run, not the end of the
    report)."""
    try:
        record = RunRecord.from_dict(json.loads((run_dir / METRICS_FILE).read_text(),
                                                parse_constant=_refuse_constant))
    except OSError as exc:
        return f"unreadable {METRICS_FILE}: {exc}"
    except ValueError as exc:
        return f"bad {METRICS_FILE}: {exc}"
    bad = implausible(record)
    return f"bad {METRICS_FILE}: {bad}" if bad else record


def _refuse_constant(name: str) -> None:
    """``json.loads`` takes ``NaN``, ``Infinity`` and ``-Infinity``, which JSON does not allow."""
    raise ValueError(f"it holds {name}, which is not a JSON number")


MAX_COUNT = 1e15      # MACs or parameters beyond any network a run here could have (1e308 is a finite float)


def implausible(record: RunRecord) -> str:
    """The first figure of a finished run's results that no run can have ('' when none): an accuracy
    outside 0-100, a negative count or one above ``MAX_COUNT``, a latency that is not a finite positive
    number."""
    if record.results is None:
        return ""
    for name in ("base", "pruned", "final"):
        metrics = getattr(record.results, name)
        for key, value, low, high in (("top1", metrics.top1, 0, 100), ("top5", metrics.top5, 0, 100),
                                      ("macs", metrics.macs, 0, MAX_COUNT), ("params", metrics.params, 0, MAX_COUNT),
                                      *((f"latency_ms.{b}", ms, 0, MAX_COUNT) for b, ms in metrics.latency_ms.items())):
            if not isinstance(value, (int, float)) or not low <= value <= high:
                return f"results.{name}.{key}={value!r}; accepted: {low:g} to {high:g}"
    return ""


def read_overrides(run_dir: Path) -> str:
    """Hydra's command-line overrides of the run, comma-joined ('' when not a Hydra run)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    overrides = yaml.safe_load(path.read_text()) or []
    return ",".join(str(o) for o in overrides)


def run_row(run_dir: Path, record: RunRecord | str, label: str) -> dict[str, Any]:
    """One report row: status, the setting columns and, for a finished run, its results row, timings and
    cache status. ``series_key`` is the run's identity without the seed and the pruned amount: runs sharing
    it are the points of one plotted line, and those that share the amount too are seeds of one setting."""
    row: dict[str, Any] = {"run": label, "path": str(run_dir), "overrides": read_overrides(run_dir)}
    if isinstance(record, str):
        return {**row, "status": FAILED, "error": record}
    row.update(status=record.status, error=record.error)
    if record.settings is None:
        return {**row, **config_columns(record.config or {})}
    row["series_key"] = record.settings.identity(exclude=AMOUNTS)
    if record.status != OK:
        return {**row, **record.settings.columns()}
    row.update(results_row(record))
    row.update({f"time_{stage}_s": seconds for stage, seconds in record.timings_s.items()})
    row.update({f"cache_{kind}": state for kind, state in record.cache.items()})
    row["has_train_log"] = (run_dir / TRAIN_LOG).is_file()
    return row


def collect_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """All runs under ``paths``, one row each (finished, failed, unfinished), sorted by model/scorer/ratio.

    ``run`` is the run's path below the runs' common folder (in a sweep: Hydra's ``override_dirname``,
    i.e. what varied); ``path`` is absolute.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportError("no run or sweep directory given")
    run_dirs = find_run_dirs(paths)
    if not run_dirs:
        raise ReportError(f"no {METRICS_FILE} found under: {', '.join(map(str, paths))}")
    labels = _labels(run_dirs)
    df = pd.DataFrame([run_row(d, read_record(d), labels[d]) for d in run_dirs])
    keys = [k for k in SORT_KEYS if k in df.columns]
    return df.sort_values(keys, na_position="last", kind="stable", key=_sort_key).reset_index(drop=True)


def _labels(run_dirs: Sequence[Path]) -> dict[Path, str]:
    """Each run's path below the runs' deepest common folder: in one sweep, what varied."""
    if len(run_dirs) == 1:
        return {run_dirs[0]: run_dirs[0].name}
    common = Path(os.path.commonpath(run_dirs))
    return {d: str(d.relative_to(common)) for d in run_dirs}


def _sort_key(column: pd.Series) -> pd.Series:
    """Numbers sort as numbers, anything else as text (columns may mix None, floats and strings)."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().sum() == column.notna().sum():
        return numeric
    return column.astype("string")


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == OK]


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == FAILED]


def unfinished_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs whose record still says ``running``: under way, or killed."""
    return df[df["status"] == RUNNING]


# --------------------------------------------------------------------------------------------- tables

def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured table (pandas' ``to_markdown`` needs the optional ``tabulate``)."""
    def cell(value: Any) -> str:
        if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
            return ""
        if isinstance(value, float):
            return f"{value:g}" if abs(value) < 1e6 else f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def results_markdown(df: pd.DataFrame, plots: Sequence[Path] = ()) -> str:
    """``results.md``: the finished runs, the published reference rows for their models, the failed runs
    and the unfinished ones (still running, or killed)."""
    ok, failed, unfinished = ok_runs(df), failed_runs(df), unfinished_runs(df)
    parts = [f"# Results\n\n{len(ok)} finished run(s), {len(failed)} failed, {len(unfinished)} unfinished.\n"]
    if len(ok):
        ok, untrusted = marked_speedups(ok.assign(series=series_labels(ok)))
        columns = [c for c in MD_COLUMNS if c in ok.columns and ok[c].notna().any()]
        table = ok[["run", *columns]].rename(columns=MD_COLUMNS)
        parts.append(markdown_table(table))
        if untrusted:
            parts.append(f"(x)? = untrusted speed-up: a latency spread (IQR / median) above {MAX_SPREAD:g}, the "
                         "machine was too busy for the ratio to be a result; rerun on a quieter one.\n")
        parts.append(time_summary(ok))
        by_ratio = ratio_table(ok)
        if len(by_ratio):
            parts.append("## Top-1 by pruning ratio\n\nFinal top-1 (%) of the uniform-ratio runs, mean over seeds.\n")
            parts.append(markdown_table(by_ratio))
    refs = _references_for_runs(ok)
    if refs:
        parts.append("## Published references\n\nAs stated by each paper (their own baselines and "
                     "training; fine-tuned unless marked otherwise).\n")
        parts.append(markdown_table(references_frame(refs)))
    if len(failed):
        parts.append("## Failed runs\n")
        parts.append(markdown_table(failed[["run", "overrides", "error"]]))
    if len(unfinished):
        parts.append("## Unfinished runs\n\nTheir record still says running: under way, or killed.\n")
        parts.append(markdown_table(unfinished[["run", "overrides"]]))
    parts += [f"![{p.stem}]({p.name})\n" for p in plots]
    return "\n".join(parts)


def marked_speedups(ok: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The speed-up columns as text, an untrusted one marked ``(x)?`` (its ``speedup_trusted_*`` column
    false); and whether any was. Runs recorded without the trust flag keep their plain figure."""
    out, untrusted = ok.copy(), False
    for column in ok.columns:
        match = re.fullmatch(r"((?:onnxruntime_)?)speedup_(b\d+)", column)
        flag = f"{match[1]}speedup_trusted_{match[2]}" if match else None
        if column == "measured_speedup":
            flag = "measured_speedup_trusted"
        if flag not in ok.columns:
            continue
        trusted = ok[flag].map(lambda t: bool(pd.isna(t) or t))
        untrusted |= bool((~trusted & ok[column].notna()).any())
        out[column] = [None if pd.isna(v) else speedup_text(v, t) for v, t in zip(ok[column], trusted)]
    return out, untrusted


def ratio_table(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per model, dataset and series (every setting but the ratio and the seed), one column per
    uniform ratio: final top-1 (mean over seeds), and the MACs reduction (in the header where every row of
    the column shares it)."""
    runs = ok[ok["protocol"] == "ratio"] if "protocol" in ok.columns else ok.iloc[:0]
    if not len(runs):
        return runs
    runs = runs.assign(series=series_labels(runs))
    cells = runs.groupby(["model", "dataset", "series_key", "prune.ratio"], sort=False).agg(
        top1=("pruned_top1", "mean"), base=("base_top1", "mean"), macs=("MACs_reduction_%", "mean"))
    shared = runs.groupby("prune.ratio")["MACs_reduction_%"].nunique() == 1
    text = [f"{top1:.2f}" if shared[ratio] else f"{top1:.2f} (-{macs:.1f}% MACs)"
            for (*_, ratio), top1, macs in zip(cells.index, cells["top1"], cells["macs"])]
    table = cells.assign(cell=text)["cell"].unstack("prune.ratio")
    table = table[sorted(table.columns)]
    macs = runs.groupby("prune.ratio")["MACs_reduction_%"].first()
    table.columns = [f"ratio {r:g} (-{macs[r]:.1f}% MACs)" if shared[r] else f"ratio {r:g}"
                     for r in table.columns]
    base = cells["base"].groupby(level=["model", "dataset", "series_key"], sort=False).first()
    label = runs.groupby("series_key")["series"].first()
    table = table.assign(**{"base top-1": base}).reset_index()
    table["series_key"] = table["series_key"].map(label)
    return table.rename(columns={"series_key": "series"})[["model", "dataset", "series", "base top-1",
                                                           *table.columns[3:-1]]]


def time_summary(ok: pd.DataFrame) -> str:
    """Job time summed over the finished runs, split by stage (what a sweep's wall time was spent on)."""
    stages = [c for c in ok.columns if c.startswith("time_") and c.endswith("_s") and c != "time_total_s"]
    if "time_total_s" not in ok.columns:
        return ""
    total = ok["time_total_s"].sum()
    parts = [f"{c[5:-2]} {ok[c].sum():.1f} s" for c in stages if ok[c].notna().any()]
    other = total - sum(ok[c].sum() for c in stages)
    parts.append(f"other (loading) {other:.1f} s")
    return f"Job time summed over these runs: {total:.1f} s ({', '.join(parts)}).\n"


def references_frame(refs: Sequence[Reference]) -> pd.DataFrame:
    return pd.DataFrame([{
        "method": r.method, "model": r.model, "base top-1": r.base_top1, "top-1": r.top1,
        "top-1 drop": r.top1_drop, "MACs (M)": r.macs_M, "MACs ↓%": r.macs_reduction_pct,
        "params (M)": r.params_M, "params ↓%": r.params_reduction_pct,
        "fine-tuned": "yes" if r.finetuned else "no", "source": f"{r.source}, {r.where}",
    } for r in refs])


def _references_for_runs(ok: pd.DataFrame) -> list[Reference]:
    pairs = ok[["model", "dataset"]].drop_duplicates().itertuples(index=False) if len(ok) else []
    return [ref for model, dataset in pairs for ref in references_for(str(model), str(dataset))]


# --------------------------------------------------------------------------------------------- plots

def series_parts(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per run, its criterion (the scorer, with its similarity metric where not SSIM: the colour of a line)
    and its variant (the line style): the recovery label and fine-tuning, then ``key=value`` for any other
    setting, the seed and the pruned amount aside, where runs of one panel whose labels would be equal
    differ in it (the panel's most common value goes unsaid). Runs of different settings (``series_key``) never
    share both within a model and dataset."""

    def criterion(run: pd.Series) -> str:
        metric = run.get("scorer.metric")
        return f"{run['scorer']} ({metric})" if _given(metric) and metric != "ssim" else str(run["scorer"])

    def variant(run: pd.Series) -> str:
        text = f" +{run['recovery']}" if _given(run.get("recovery")) and run["recovery"] != "none" else ""
        if _given(run.get("finetune.epochs")) and run["finetune.epochs"] > 0:
            text += f", FT {int(run['finetune.epochs'])} ep"
        return text

    criteria, variants = runs.apply(criterion, axis=1), runs.apply(variant, axis=1)
    panel = runs["model"].astype(str) + "|" + runs["dataset"].astype(str) + "|"
    covered = _LABELLED | set(AMOUNTS) | {"seed"}
    for column in (c for c in runs.columns if is_setting_column(c) and c not in covered):
        values = runs[column].map(_text)
        common = values.groupby(panel).agg(lambda v: v.value_counts().sort_index().idxmax())
        for _, members in values.groupby(panel + criteria + variants):
            if members.nunique() < 2:
                continue
            for index, value in members.items():
                if value != common[panel[index]]:
                    variants[index] += f", {column}={value}" if value else f", {column} unset"
    return criteria, variants


def series_labels(runs: pd.DataFrame) -> pd.Series:
    """What names a line of the plot or a row of the ratio table: criterion and variant."""
    criterion, variant = series_parts(runs)
    return criterion + variant


def _text(value: Any) -> str:
    if not _given(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _given(value: Any) -> bool:
    return value is not None and not (pd.api.types.is_scalar(value) and pd.isna(value))


def _setting_text(columns: Any) -> str:
    """The pruning amount as its protocol states it: 'ratio 0.5', 'threshold 0.9', 'rates [...]'."""
    protocol = columns.get("protocol") or "ratio"
    return f"{protocol} {columns.get(f'prune.{protocol}')}"


def plot_pareto(df: pd.DataFrame) -> Figure:
    """Top-1 change against MACs reduction as small multiples: one row per model and dataset, one panel
    per recovery; one line per series (a setting but for the pruned amount), one colour per criterion
    (``criterion_colors``, the same in every plot), one line style per remaining variant (fine-tuning, other
    settings); published rows as hollow markers labelled with their paper.

    The y axis is the change from each run's own baseline so that papers with other baselines (and QSFM,
    which states only its drop) sit on the same scale. Seeds of one setting are averaged.
    """
    ok = ok_runs(df).copy()
    if not len(ok):
        raise ReportError("no finished run to plot")
    ok["top1_change"] = -ok["top1_drop"].astype(float)
    ok["criterion"], variants = series_parts(ok)
    ok["recovery"] = ok["recovery"].astype(str) if "recovery" in ok.columns else "none"
    ok["variant"] = [v.removeprefix(f" +{r}") for v, r in zip(variants, ok["recovery"])]
    amounts = [c for c in AMOUNTS if c in ok.columns]
    colors = criterion_colors(ok["criterion"])
    variant_names = sorted(ok["variant"].unique())
    styles = dict(zip(variant_names, _LINE_STYLES * (len(variant_names) // len(_LINE_STYLES) + 1)))
    rows = sorted(ok.groupby(["model", "dataset"]).groups)
    recoveries = sorted(ok["recovery"].unique())
    fig, groups = _panel_groups(len(rows), len(recoveries))
    for (model, dataset), row_axes in zip(rows, groups):
        for recovery, ax in zip(recoveries, row_axes):
            runs = ok[(ok["model"] == model) & (ok["dataset"] == dataset) & (ok["recovery"] == recovery)]
            for _, points in sorted(runs.groupby("series_key", sort=False),
                                    key=lambda group: group[1]["criterion"].iloc[0] + group[1]["variant"].iloc[0]):
                criterion, variant = points["criterion"].iloc[0], points["variant"].iloc[0]
                setting = points.groupby(amounts, dropna=False)[["MACs_reduction_%", "top1_change"]]
                mean, std = setting.mean().sort_values("MACs_reduction_%"), setting.std()
                ax.errorbar(mean["MACs_reduction_%"], mean["top1_change"],
                            yerr=std.loc[mean.index, "top1_change"].fillna(0.0), marker="o", ms=4, capsize=2,
                            label=criterion + variant, color=colors[criterion], ls=styles[variant])
            _plot_references(ax, references_for(str(model), str(dataset)), colors)
            ax.axhline(0.0, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{model} on {dataset}, recovery {recovery}", fontsize=9)
            ax.set_xlabel("MACs reduction (%)")
            ax.grid(alpha=0.3)
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("top-1 change vs own baseline (pp)")
    handles = [Line2D([], [], color=colors[c], lw=2, label=c) for c in sorted(ok["criterion"].unique())]
    if len(variant_names) > 1:
        handles += [Line2D([], [], color="black", ls=styles[v], label=v.lstrip(", ") or "as is")
                    for v in variant_names]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8)
    return fig


_PANEL_COLUMNS = 4   # panels of one model wrap after this many, so that a sweep over many recoveries stays legible


def _panel_groups(models: int, recoveries: int) -> tuple[Figure, list[list[Any]]]:
    """A figure with one group of ``recoveries`` panels per model and dataset, wrapped into lines of at most
    ``_PANEL_COLUMNS``; the panels of a group share their y axis."""
    columns = min(recoveries, _PANEL_COLUMNS)
    lines = -(-recoveries // columns)
    fig = Figure(figsize=(5.0 * columns, 4.2 * lines * models + 1.0), layout="constrained")
    grid = fig.subplots(lines * models, columns, squeeze=False).ravel()
    groups = []
    for first in range(0, models * lines * columns, lines * columns):
        group = list(grid[first:first + recoveries])
        for ax in group[1:]:
            ax.sharey(group[0])
        for ax in grid[first + recoveries:first + lines * columns]:
            fig.delaxes(ax)
        groups.append(group)
    return fig, groups


_REF_MARKERS = {"qsfm": "*", "hrank": "s", "chip": "D"}
_LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def _plot_references(ax: Any, refs: Sequence[Reference], colors: dict[str, str]) -> None:
    """Published rows as hollow markers labelled with their method ("FT": fine-tuned), in the colour of the
    same criterion's line when there is one (the results table names the papers)."""
    for ref in refs:
        if ref.macs_reduction_pct is None or ref.top1_drop is None:
            continue
        color = colors.get(ref.method, "black")
        ax.scatter([ref.macs_reduction_pct], [-ref.top1_drop], marker=_REF_MARKERS.get(ref.method, "X"),
                   s=80, facecolors="none", edgecolors=color, linewidths=1.4, zorder=3)
        name = ref.label.split(",")[0] + (" FT" if ref.finetuned else "")
        note = ax.annotate(name, (ref.macs_reduction_pct, -ref.top1_drop), textcoords="offset points",
                           xytext=(5, 4), fontsize=7, color=color)
        note.set_in_layout(False)


def criterion_colors(criteria: Iterable[str]) -> dict[str, str]:
    """One colour per criterion, the same in every plot and report: the registered scorers take the
    first colours in name order, any other criterion (a scorer with another metric) the next ones."""
    known = sorted(list_scorers())
    extra = sorted(set(criteria) - set(known))
    return {c: f"C{i % 10}" if i < 10 else _MORE_COLORS[(i - 10) % len(_MORE_COLORS)]
            for i, c in enumerate(known + extra)}


_MORE_COLORS = ["black", "olive", "teal", "navy", "maroon", "gold"]
_PLANNER_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v")]


def planner(run: pd.Series) -> str:
    """How a run chose its widths: the protocol, with the allocation where it has one."""
    protocol = run.get("protocol") or "ratio"
    allocation = run.get("prune.allocation")
    if protocol in ("target_speedup", "target_macs_reduction") and _given(allocation):
        return f"{protocol} ({allocation})"
    return str(protocol)


def plot_speedup(df: pd.DataFrame) -> Figure | None:
    """Final top-1 against the measured speed-up of the runs that measured one (a speed-up target's
    ``measured_speedup``), as small multiples: one row per model and dataset, one panel per recovery; one
    colour per criterion (``criterion_colors``), one line style per planner; seeds averaged; an untrusted
    measurement drawn hollow. None when no run measured a speed-up."""
    ok = ok_runs(df)
    if "measured_speedup" not in ok.columns or not ok["measured_speedup"].notna().any():
        return None
    runs = ok[ok["measured_speedup"].notna()].copy()
    runs["criterion"], runs["variant"] = series_parts(runs)
    runs["planner"] = runs.apply(planner, axis=1)
    runs["trusted"] = runs.get("measured_speedup_trusted", pd.Series(True, index=runs.index)).map(
        lambda t: bool(pd.isna(t) or t))
    colors = criterion_colors(runs["criterion"])
    planners = sorted(runs["planner"].unique())
    styles = {p: _PLANNER_STYLES[i % len(_PLANNER_STYLES)] for i, p in enumerate(planners)}
    rows = sorted(runs.groupby(["model", "dataset"]).groups)
    recoveries = sorted(runs["recovery"].astype(str).unique())
    fig = Figure(figsize=(4.6 * len(recoveries), 3.9 * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), len(recoveries), squeeze=False, sharey="row")
    amounts = [c for c in AMOUNTS if c in runs.columns]
    for (model, dataset), row_axes in zip(rows, axes):
        for recovery, ax in zip(recoveries, row_axes):
            panel = runs[(runs["model"] == model) & (runs["dataset"] == dataset)
                         & (runs["recovery"].astype(str) == recovery)]
            for _, points in panel.groupby("series_key", sort=True):
                first = points.iloc[0]
                mean = points.groupby(amounts, dropna=False).agg(
                    x=("measured_speedup", "mean"), y=("pruned_top1", "mean"), trusted=("trusted", "all"))
                mean = mean.sort_values("x")
                line, marker = styles[first["planner"]]
                color = colors[first["criterion"]]
                ax.plot(mean["x"], mean["y"], ls=line, color=color, lw=1.2)
                for trusted, group in mean.groupby("trusted"):
                    ax.scatter(group["x"], group["y"], marker=marker, s=30, color=color,
                               facecolors=color if trusted else "none", zorder=3)
            if len(panel):
                ax.axhline(panel["base_top1"].mean(), color="grey", lw=0.8, ls=":")
            ax.set_title(f"{model} on {dataset}, recovery {recovery}", fontsize=9)
            ax.set_xlabel("measured speed-up (x)")
            ax.grid(alpha=0.3)
        row_axes[0].set_ylabel("top-1 (%)")
    handles = [Line2D([], [], color=colors[c], lw=2, label=c) for c in sorted(runs["criterion"].unique())]
    handles += [Line2D([], [], color="black", ls=styles[p][0], marker=styles[p][1], label=p) for p in planners]
    handles.append(Line2D([], [], color="black", marker="o", ls="none", markerfacecolor="none",
                          label="untrusted measurement"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8)
    fig.suptitle(f"top-1 vs measured speed-up ({_conditions_text(runs)}; dotted: unpruned)", fontsize=10)
    return fig


def _conditions_text(runs: pd.DataFrame) -> str:
    """The runtime, batch and threads the speed-ups were measured on (several when the runs differ)."""
    columns = ["prune.latency_runtime", "prune.latency_batch", "prune.latency_threads"]
    if not all(c in runs.columns for c in columns):
        return "conditions not recorded"
    found = runs[columns].drop_duplicates().itertuples(index=False)
    return "; ".join(f"{r}, batch {int(b)}, {int(t)} thread{'s' if t > 1 else ''}" for r, b, t in found)


def plot_kept_channels(run_dir: Path) -> Figure:
    """Kept vs total channels of every pruned layer of one finished run."""
    record = read_record(run_dir)
    if isinstance(record, str):
        raise ReportError(f"run {str(run_dir)!r} has a {record}")
    if record.results is None:
        why = f"failed ({record.error})" if record.status == FAILED else "is unfinished (running, or killed)"
        raise ReportError(f"run {str(run_dir)!r} {why}: its kept channels are known only once it has finished")
    kept = record.results.kept_channels
    columns = record.settings.columns()
    names = list(kept)
    totals = [kept[n]["total"] for n in names]
    fig = Figure(figsize=(max(6.0, 0.22 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(names, totals, color="lightgrey", label="total")
    ax.bar(names, [kept[n]["kept"] for n in names], color="tab:blue", label="kept")
    ax.set_ylabel("channels")
    ax.set_title(f"kept channels: {columns['model']} / {columns['scorer']} / {_setting_text(columns)} / "
                 f"recovery {columns['recovery']}\n" + "\n".join(textwrap.wrap(run_dir.name, 90)), fontsize=9)
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.legend(fontsize=8)
    return fig


def plot_finetune(df: pd.DataFrame) -> Figure | None:
    """Test top-1 and training loss per epoch for every run that was fine-tuned; None when none was."""
    runs = ok_runs(df)
    if "has_train_log" not in runs:
        return None
    runs = runs[runs["has_train_log"].astype(bool)]
    if not len(runs):
        return None
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for (_, run), series in zip(runs.iterrows(), series_labels(runs)):
        log = pd.read_csv(Path(run["path"]) / TRAIN_LOG)
        label = f"{run['model']} {series}, {_setting_text(run)}"
        acc_ax.plot(log["epoch"], log["test_top1"], marker=".", label=label)
        loss_ax.plot(log["epoch"], log["loss"], marker=".", label=label)
    acc_ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="fine-tuning: test top-1")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="fine-tuning: loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return path


# --------------------------------------------------------------------------------------------- report

def write_report(df: pd.DataFrame, out_dir: str | Path, layers_run: str | Path | None = None) -> list[Path]:
    """Write results.csv, failed.csv (failed and unfinished runs, if any), the plots and results.md into
    ``out_dir``.

    ``layers_run`` picks the run of ``kept_channels.png``; default: the first finished run.
    Returns the written paths.
    """
    out = Path(out_dir)
    ok, rest = ok_runs(df), df[df["status"] != OK]
    internal = ["status", "error", "has_train_log", "series_key"]
    written = [_write_frame(ok.drop(columns=internal, errors="ignore").dropna(axis=1, how="all"),
                            out / "results.csv")]
    if len(rest):
        settings = [c for c in rest.columns if is_setting_column(c) and rest[c].notna().any()]
        written.append(_write_frame(rest[["run", "path", "status", "overrides", *settings, "error"]],
                                    out / "failed.csv"))
    plots = []
    # What matplotlib warns about (a degenerate axis range, a missing glyph) is no concern of the reader's.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plots += _write_plots(df, ok, out, layers_run) if len(ok) else []
    md = out / "results.md"
    write_text(md, results_markdown(df, plots))
    return written + plots + [md]


def _write_plots(df: pd.DataFrame, ok: pd.DataFrame, out: Path, layers_run: str | Path | None) -> list[Path]:
    layer_dir = Path(layers_run) if layers_run is not None else Path(ok.iloc[0]["path"])
    plots = [save_png(plot_pareto(df), out / "pareto.png"),
             save_png(plot_kept_channels(layer_dir), out / "kept_channels.png")]
    for name, fig in (("speedup", plot_speedup(df)), ("finetune", plot_finetune(df))):
        if fig is not None:
            plots.append(save_png(fig, out / f"{name}.png"))
    return plots


def _write_frame(df: pd.DataFrame, path: Path) -> Path:
    write_text(path, df.to_csv(index=False))
    return path


# --------------------------------------------------------------------------------------------- compare

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``a.b.c`` keys; lists stay as one value."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def run_config(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The resolved config: from metrics.json, else Hydra's ``.hydra/config.yaml``."""
    if isinstance(metrics.get("config"), dict):
        return metrics["config"]
    path = run_dir / ".hydra" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def side_by_side(a: dict[str, Any], b: dict[str, Any]) -> pd.DataFrame:
    """Rows ``key | A | B``, differing keys first (each part in key order)."""
    keys = sorted(set(a) | set(b))
    missing = "<absent>"
    rows = [{"key": k, "A": a.get(k, missing), "B": b.get(k, missing)} for k in keys]
    frame = pd.DataFrame(rows, columns=["key", "A", "B"])
    frame["differs"] = [_differs(r["A"], r["B"]) for r in rows]
    return frame.sort_values(["differs", "key"], ascending=[False, True], kind="stable")


def _differs(x: Any, y: Any) -> bool:
    return json.dumps(x, sort_keys=True, default=str) != json.dumps(y, sort_keys=True, default=str)


def compare_runs(a: str | Path, b: str | Path) -> str:
    """Two runs' configs (differences first) and metrics side by side, as text."""
    dirs = []
    for path in map(Path, (a, b)):
        run_dir = path.parent if path.name == METRICS_FILE else path
        if not (run_dir / METRICS_FILE).is_file():
            raise ReportError(f"not a run directory (no {METRICS_FILE}): {str(path)!r}")
        dirs.append(run_dir)
    metrics = [_read_json(d) for d in dirs]
    configs = side_by_side(*(flatten(run_config(d, m)) for d, m in zip(dirs, metrics)))
    values = side_by_side(*(_comparable_metrics(m) for m in metrics))
    n_diff = int(configs["differs"].sum())
    lines = [f"A: {dirs[0]}", f"B: {dirs[1]}", "",
             f"== config: {n_diff} differ, {len(configs) - n_diff} same ==",
             _frame_text(configs), "", "== metrics ==", _frame_text(values)]
    return "\n".join(lines) + "\n"


def _read_json(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` as it is (``{}`` when it is not a JSON object): compare shows whatever it holds."""
    try:
        data = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _comparable_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The record without the config (shown above), plus the results row's derived figures (drop,
    reductions, speedups); per-layer channels summed to one figure."""
    results = metrics.get("results") if isinstance(metrics.get("results"), dict) else {}
    flat = flatten({k: v for k, v in metrics.items() if k not in ("config", "results")})
    flat.update(flatten({k: v for k, v in results.items() if k != "kept_channels"}, "results"))
    if metrics.get("status") == OK:
        try:
            row = results_row(RunRecord.from_dict(metrics))
        except ValueError:
            row = {}
        flat.update({f"summary.{k}": v for k, v in row.items() if not is_setting_column(k)})
    kept = results.get("kept_channels")
    if kept:
        flat["kept_channels.kept/total"] = (f"{sum(v['kept'] for v in kept.values())}"
                                            f"/{sum(v['total'] for v in kept.values())}")
    return flat


def _frame_text(frame: pd.DataFrame) -> str:
    shown = frame.assign(differs=frame["differs"].map({True: "*", False: ""}))
    return shown[["differs", "key", "A", "B"]].to_string(index=False, max_colwidth=60)


# --------------------------------------------------------------------------------------------- cli

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsfm-report",
        description="Merge qsfm-run run/sweep directories into results.csv, results.md and plots.")
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="run or sweep directories (searched at any depth for metrics.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: <first PATH>/report)")
    parser.add_argument("--layers", type=Path, default=None, metavar="RUN_DIR",
                        help="run whose per-layer kept channels are plotted (default: the first run)")
    parser.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("A", "B"),
                        help="print two runs' configs and metrics side by side")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare is None and not args.paths:
        parser.error("give at least one PATH, or --compare A B")
    try:
        if args.compare is not None:
            sys.stdout.write(compare_runs(*args.compare))
        if args.paths:
            df = collect_runs(args.paths)
            out = args.out if args.out is not None else _default_out(Path(args.paths[0]))
            written = write_report(df, out, args.layers)
            ok, failed, unfinished = len(ok_runs(df)), len(failed_runs(df)), len(unfinished_runs(df))
            print(f"{ok} finished run(s), {failed} failed, {unfinished} unfinished; wrote "
                  + ", ".join(str(p) for p in written))
    except ReportError as exc:
        parser.exit(2, f"qsfm-report: error: {exc}\n")
    except OSError as exc:
        parser.exit(2, f"qsfm-report: error: cannot write {exc.filename}: {exc.strerror}\n")
    return 0


def _default_out(first: Path) -> Path:
    return (first.parent if first.is_file() else first) / "report"


if __name__ == "__main__":
    raise SystemExit(main())
