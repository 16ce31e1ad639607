"""qsfm-report on hand-made run directories (the layout qsfm-run writes)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qsfm_cli import report
from qsfm_cli.record import Metrics
from qsfm_cli.outputs import write_record
from qsfm_cli.papers import REFERENCES, references_for
from qsfm_cli.plan import PlanSpec
from qsfm_cli.record import FAILED, OK, RUNNING, Results, RunRecord, Settings
from qsfm_cli.recover import get_recovery
from qsfm_cli.scoring import get_scorer
from qsfm_cli.train import TrainRecipe

from .conftest import assert_png

BASE = Metrics(top1=93.0, top5=99.5, macs=125_000_000, params=850_000, latency_ms={"b1": 2.0, "b64": 40.0})


def _measured(top1: float, keep: float) -> Metrics:
    return Metrics(top1=top1, top5=99.0, macs=int(BASE.macs * keep), params=int(BASE.params * keep),
                   latency_ms={"b1": 2.0 * keep, "b64": 40.0 * keep})


def settings(scorer: str = "l1", ratio: float = 0.5, *, model: str = "resnet56", dataset: str = "cifar10",
             seed: int = 0, finetune_epochs: int = 0, plan: dict | None = None, recover: str = "none",
             recover_options: dict | None = None, scorer_options: dict | None = None, num_images: int = 512,
             finetune: dict | None = None, weights: str = "pretrained") -> Settings:
    """The settings qsfm-run records, built from the real specs (scorer=random's seed follows the run's,
    as conf/scorer/random.yaml says)."""
    scorer_options = {**({"seed": seed} if scorer == "random" else {}), **(scorer_options or {})}
    return Settings.of(model={"name": model, "weights": weights}, dataset={"name": dataset},
                       scorer=get_scorer(scorer, **scorer_options),
                       plan=PlanSpec(**{"ratio": ratio, **(plan or {})}),
                       recovery=get_recovery(recover, **(recover_options or {})),
                       finetune=TrainRecipe(epochs=finetune_epochs, **(finetune or {})), num_images=num_images,
                       seed=seed)


def make_run(root: Path, scorer: str, ratio: float, *, top1: float = 90.0, name: str | None = None,
             **setting) -> Path:
    """A finished run as qsfm-run writes it; the folder name is Hydra's override_dirname."""
    seed = setting.get("seed", 0)
    run = root / (name or f"prune.ratio={ratio},scorer={scorer},seed={seed}")
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- scorer={scorer}\n- prune.ratio={ratio}\n- seed={seed}\n")
    keep = 1.0 - ratio * 0.9
    pruned = _measured(top1, keep)
    finetune_epochs = setting.get("finetune_epochs", 0)
    final = _measured(top1 + 1.0, keep) if finetune_epochs else pruned
    kept = {f"layer{i}.conv1": {"kept": round(16 * (1 - ratio)), "total": 16} for i in range(1, 4)}
    record = RunRecord(settings(scorer, ratio, **setting), status=OK,
                       results=Results(BASE, pruned, final, kept, {"protocol": "ratio"}, {}),
                       timings_s={"collect": 1.0, "score": 2.0, "prune": 0.5, "finetune": 0.0, "evaluate": 1.0,
                                  "total": 5.0},
                       cache={"stats": "miss", "orders": "miss"},
                       config={"model": {"name": setting.get("model", "resnet56")}, "scorer": {"name": scorer},
                               "prune": {"ratio": ratio}, "seed": seed})
    write_record(run, record)
    if finetune_epochs:
        epochs = range(1, finetune_epochs + 1)
        pd.DataFrame({"epoch": epochs, "lr": 0.01, "loss": [1.0 / e for e in epochs], "train_top1": 80.0,
                      "test_top1": [top1 + e / finetune_epochs for e in epochs], "seconds": 1.0}
                     ).to_csv(run / "train_log.csv", index=False)
    return run


def make_failed(root: Path, scorer: str, ratio: float) -> Path:
    """A run refused before its settings were known: only its config says what was asked."""
    run = root / f"prune.ratio={ratio},scorer={scorer}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- scorer={scorer}\n- prune.ratio={ratio}\n")
    write_record(run, RunRecord(None, status=FAILED, error=f"ValueError: prune.ratio must be in [0, 1), got {ratio}",
                                config={"scorer": {"name": scorer}, "prune": {"ratio": ratio}}))
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    make_run(root, "l1", 0.5, top1=85.0)
    make_run(root, "qsfm", 0.5, top1=88.0)
    make_run(root, "qsfm", 0.3, top1=91.0)
    make_run(root, "l1", 0.3, top1=89.0)
    make_failed(root, "hrank", 1.5)
    return tmp_path / "multirun"


def test_collect_sorts_by_model_scorer_ratio_and_keeps_failed_apart(sweep: Path) -> None:
    df = report.collect_runs([sweep])
    ok = report.ok_runs(df)
    assert list(zip(ok["scorer"], ok["prune.ratio"])) == [("l1", 0.3), ("l1", 0.5), ("qsfm", 0.3), ("qsfm", 0.5)]
    failed = report.failed_runs(df)
    assert len(failed) == 1 and "got 1.5" in failed.iloc[0]["error"]
    assert failed.iloc[0]["overrides"] == "scorer=hrank,prune.ratio=1.5"
    assert failed.iloc[0]["prune.ratio"] == 1.5  # a failed run's settings come from its config
    # the run label is what varied in the sweep (Hydra's override_dirname)
    assert ok.iloc[0]["run"] == "prune.ratio=0.3,scorer=l1,seed=0"
    assert ok.iloc[2]["top1_drop"] == pytest.approx(2.0) and ok.iloc[2]["time_score_s"] == 2.0


@pytest.mark.slow
def test_write_report_writes_tables_and_valid_pngs(sweep: Path, tmp_path: Path) -> None:
    df = report.collect_runs([sweep])
    written = report.write_report(df, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"results.csv", "failed.csv", "pareto.png", "kept_channels.png", "results.md"}
    for name in ("pareto.png", "kept_channels.png"):
        assert_png(tmp_path / "out" / name)
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(csv["scorer"]) == ["l1", "l1", "qsfm", "qsfm"] and "MACs_reduction_%" in csv
    assert set(csv["recovery"]) == {"none"} and "series_key" not in csv
    assert len(pd.read_csv(tmp_path / "out" / "failed.csv")) == 1

    md = (tmp_path / "out" / "results.md").read_text()
    assert "4 finished run(s), 1 failed, 0 unfinished." in md
    results, failed = md.split("## Failed runs")
    assert results.count("| prune.ratio=") == 4 and "hrank" not in results.split("## Published")[0]
    assert "| prune.ratio=0.3,scorer=qsfm,seed=0 | resnet56 | cifar10 | qsfm | ratio | 0.3 | 0 | 0 | 93 | 91 |" in results
    assert "got 1.5" in failed and "scorer=hrank,prune.ratio=1.5" in failed
    # the ResNet-56 papers are listed with their source
    assert "HRank, Lin et al., CVPR 2020" in md and "62.72" in md and "QSFM, Wang et al. 2021" in md
    assert "![pareto](pareto.png)" in md
    assert "Job time summed over these runs: 20.0 s (collect 4.0 s, score 8.0 s," in md
    assert "other (loading) 2.0 s)" in md


def test_finetune_curves_only_when_a_run_has_a_train_log(tmp_path: Path) -> None:
    make_run(tmp_path / "sweep", "qsfm", 0.5, finetune_epochs=3)
    make_run(tmp_path / "sweep", "qsfm", 0.3)
    written = report.write_report(report.collect_runs([tmp_path / "sweep"]), tmp_path / "out")
    assert_png(tmp_path / "out" / "finetune.png")
    assert tmp_path / "out" / "finetune.png" in written
    md = (tmp_path / "out" / "results.md").read_text()
    assert "FT epochs" in md and "## Failed runs" not in md


def test_seeds_are_averaged_and_models_get_their_own_panel(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    make_run(root, "l1", 0.5, seed=0, top1=80.0)
    make_run(root, "l1", 0.5, seed=1, top1=82.0)
    make_run(root / "r20", "l1", 0.5, model="resnet20", top1=70.0)
    make_run(root / "random", "random", 0.5, seed=0, top1=60.0)
    make_run(root / "random", "random", 0.5, seed=1, top1=64.0)
    fig = report.plot_pareto(report.collect_runs([root]))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["resnet20 on cifar10, recovery none", "resnet56 on cifar10, recovery none"]
    lines = {c.get_label(): list(c.lines[0].get_ydata()) for c in axes[1].containers}
    assert lines["l1"] == pytest.approx([-(93.0 - 81.0)])  # one point, the mean of the two seeds
    # scorer=random follows the run's seed: its seeds are one setting too
    assert lines["random"] == pytest.approx([-(93.0 - 62.0)])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "l1" in legend and "random" in legend
    # published rows are labelled markers in their model's panels only
    assert any(t.get_text() == "CHIP FT" for t in axes[1].texts)
    assert not any("HRank" in t.get_text() for t in axes[0].texts)


def test_panels_of_many_recoveries_wrap_and_share_their_y_axis(tmp_path: Path) -> None:
    recoveries = ["none", "twin", "lstsq", "sequential", "blockwise"]
    for recover in recoveries:
        make_run(tmp_path / recover, "l1", 0.5, recover=recover)
    axes = report.plot_pareto(report.collect_runs([tmp_path])).get_axes()
    assert len(axes) == len(recoveries)
    assert {ax.get_subplotspec().get_gridspec().ncols for ax in axes} == {report._PANEL_COLUMNS}
    assert all(ax.get_shared_y_axes().joined(axes[0], ax) for ax in axes)
    assert [ax.get_ylabel() != "" for ax in axes] == [True, False, False, False, True]


def test_layers_picks_the_run_and_rejects_a_run_without_channels(sweep: Path, tmp_path: Path) -> None:
    df = report.collect_runs([sweep])
    chosen = next(sweep.rglob("prune.ratio=0.3,scorer=qsfm,seed=0"))
    report.write_report(df, tmp_path / "out", layers_run=chosen)
    assert_png(tmp_path / "out" / "kept_channels.png")
    failed = next(sweep.rglob("prune.ratio=1.5,scorer=hrank"))
    with pytest.raises(report.ReportError, match="failed .ValueError: prune.ratio must be in .*finished"):
        report.write_report(df, tmp_path / "out2", layers_run=failed)


def test_bad_paths_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(report.ReportError, match="no such run or sweep directory"):
        report.collect_runs([tmp_path / "missing"])
    with pytest.raises(report.ReportError, match="no metrics.json found"):
        report.collect_runs([tmp_path])


@pytest.mark.parametrize("text, error", [
    ("{not json", "bad metrics.json: Expecting property name"),
    ("null", "bad metrics.json: not a JSON object but NoneType"),
    ("[1, 2, 3]", "bad metrics.json: not a JSON object but list"),
    ('{"status": "done"}', "bad metrics.json: status 'done'; accepted: running, ok, failed"),
    ('{"status": "ok", "settings": {"model": {}}}', "bad metrics.json: missing or bad field"),
])
def test_bad_metrics_is_listed_as_failed(tmp_path: Path, text: str, error: str) -> None:
    make_run(tmp_path, "l1", 0.5)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(text)
    df = report.collect_runs([tmp_path])
    assert len(report.ok_runs(df)) == 1
    assert report.failed_runs(df).iloc[0]["error"].startswith(error)
    report.write_report(df, tmp_path / "out")
    assert "1 finished run(s), 1 failed" in (tmp_path / "out" / "results.md").read_text()


def test_unfinished_runs_are_listed_apart(tmp_path: Path) -> None:
    make_run(tmp_path, "l1", 0.5)
    killed = tmp_path / "killed"
    write_record(killed, RunRecord(settings("qsfm", 0.3), status=RUNNING))
    df = report.collect_runs([tmp_path])
    assert len(report.ok_runs(df)) == 1 and len(report.failed_runs(df)) == 0
    assert list(report.unfinished_runs(df)["scorer"]) == ["qsfm"]
    report.write_report(df, tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "1 finished run(s), 0 failed, 1 unfinished." in md and "## Unfinished runs" in md
    with pytest.raises(report.ReportError, match="is unfinished"):
        report.plot_kept_channels(killed)


def test_compare_shows_differences_first(sweep: Path) -> None:
    a = next(sweep.rglob("prune.ratio=0.3,scorer=qsfm,seed=0"))
    b = next(sweep.rglob("prune.ratio=0.5,scorer=qsfm,seed=0"))
    text = report.compare_runs(a, b)
    config_part, metrics_part = text.split("== metrics ==")
    assert "== config: 1 differ, 3 same ==" in config_part
    table = config_part.split("same ==")[1]
    lines = [line.split() for line in table.splitlines() if "prune.ratio" in line or "seed" in line]
    assert lines[0] == ["*", "prune.ratio", "0.3", "0.5"]   # the difference comes before equal keys
    assert lines[1] == ["seed", "0", "0"]
    assert "results.final.top1" in metrics_part and "91.0" in metrics_part and "88.0" in metrics_part
    assert "summary.top1_drop" in metrics_part
    assert "kept_channels.kept/total" in metrics_part


@pytest.mark.slow
def test_cli_writes_default_report_dir_and_compares(sweep: Path) -> None:
    a = next(sweep.rglob("prune.ratio=0.3,scorer=l1,seed=0"))
    b = next(sweep.rglob("prune.ratio=0.5,scorer=l1,seed=0"))
    proc = subprocess.run([sys.executable, "-m", "qsfm_cli.report", str(sweep), "--compare", str(a), str(b)],
                          capture_output=True, text=True, check=True)
    assert "4 finished run(s), 1 failed" in proc.stdout and "* prune.ratio" in proc.stdout
    assert_png(sweep / "report" / "pareto.png")
    bad = subprocess.run([sys.executable, "-m", "qsfm_cli.report", str(sweep / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such run or sweep directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_references_state_their_source_and_derive_nothing_from_other_baselines() -> None:
    assert all(r.source and r.where for r in REFERENCES)
    hrank = [r for r in references_for("resnet56", "cifar10", "hrank") if r.top1 == 93.17][0]
    assert hrank.macs_reduction_pct == pytest.approx(50.0, abs=0.05) and hrank.top1_drop == pytest.approx(0.09)
    assert hrank.params_reduction_pct == pytest.approx(42.4, abs=0.3)
    qsfm = references_for("resnet56", "cifar10", "qsfm")[0]
    assert (qsfm.macs_reduction_pct, qsfm.params_reduction_pct, qsfm.top1_drop) == (48.27, 57.90, 0.54)
    assert qsfm.as_dict()["source"].startswith("QSFM, Wang et al. 2021 (arXiv 2105.06052)")
    assert references_for("vgg16_bn", "cifar10") == []


# One setting per identifying field, each differing from the first in that field only (all at ratio 0.5).
APART = {
    "base": {},
    "model": dict(model="resnet20"),
    "dataset": dict(dataset="cifar100"),
    "weights": dict(weights="other.th"),
    "scorer": dict(scorer="l1"),
    "scorer option": dict(scorer_options={"k1": 0.02}),
    "scope": dict(plan={"scope": "stage"}),
    "min_channels": dict(plan={"min_channels": 2}),
    "recovery": dict(recover="lstsq"),
    "recovery option": dict(recover="lstsq", recover_options={"ridge": 0.1}),
    "bn_images": dict(recover_options={"bn_images": 512}),
    "bn_images count": dict(recover_options={"bn_images": 2048}),
    "iterative_steps": dict(recover_options={"iterative_steps": 2}),
    "finetune": dict(finetune_epochs=3),
    "finetune recipe": dict(finetune_epochs=3, finetune={"lr": 0.1}),
    "num_images": dict(num_images=256),
}


@pytest.mark.slow
def test_runs_differing_in_any_setting_stay_apart(tmp_path: Path) -> None:
    """Two runs are one setting only when everything but the seed is equal: seeds are averaged, any other
    difference keeps its own results row, pivot row and plot line."""
    top1 = {name: 40.0 + i for i, name in enumerate(APART)}
    for name, setting in APART.items():
        setting = dict(setting)
        make_run(tmp_path, setting.pop("scorer", "qsfm"), 0.5, top1=top1[name], name=name, **setting)
    make_run(tmp_path, "qsfm", 0.5, top1=top1["base"] + 2.0, name="base, seed 1", seed=1)
    df = report.collect_runs([tmp_path])
    report.write_report(df, tmp_path / "out")

    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    settings = [c for c in csv.columns if report.is_setting_column(c) and c != "seed"]
    assert len(csv) == len(APART) + 1
    assert len(csv[settings].astype(str).drop_duplicates()) == len(APART)

    pivot = report.ratio_table(report.ok_runs(df))
    assert len(pivot) == len(APART) and not pivot[["model", "dataset", "series"]].duplicated().any()
    final = {n: top1[n] + (1.0 if APART[n].get("finetune_epochs") else 0.0) for n in APART}
    final["base"] += 1.0   # the mean of its two seeds
    assert sorted(float(c) for c in pivot.iloc[:, -1]) == sorted(final.values())

    fig = report.plot_pareto(df)
    labels = [[c.get_label() for c in ax.containers] for ax in fig.get_axes()]
    assert sum(map(len, labels)) == len(APART) and all(len(set(ls)) == len(ls) for ls in labels)
    # a recovered result sits in its recovery's panel, which says so
    titles = [ax.get_title() for ax in fig.get_axes()]
    assert any(t.endswith("recovery lstsq") for t in titles) and any(t.endswith("recovery none") for t in titles)
    assert any("recover.bn_images=512" in label for ls in labels for label in ls)


def test_dataset_and_scope_are_not_averaged_as_seeds(tmp_path: Path) -> None:
    """The defect this guards: runs of other datasets or scopes printed as one mean cell."""
    make_run(tmp_path, "l1", 0.5, top1=90.0, name="a", dataset="cifar10")
    make_run(tmp_path, "l1", 0.5, top1=60.0, name="b", dataset="cifar100")
    make_run(tmp_path, "l1", 0.5, top1=40.0, name="c", dataset="cifar10", plan={"scope": "stage"})
    pivot = report.ratio_table(report.ok_runs(report.collect_runs([tmp_path])))
    assert sorted(pivot.iloc[:, -1]) == ["40.00", "60.00", "90.00"]
    assert list(pivot["series"]) == ["l1", "l1, prune.scope=stage", "l1"]


def make_speed_run(root: Path, scorer: str, target: float, *, allocation: str = "sensitivity",
                   recover: str = "none", top1: float = 90.0, trusted: bool = True) -> Path:
    """A finished run of a speed-up target, with its predicted and measured speed-ups."""
    plan = {"target_speedup": target, "allocation": allocation}
    run = root / f"scorer={scorer},target={target},allocation={allocation},recover={recover}"
    keep = 1 / target
    pruned = _measured(top1, keep)
    speed = {"target_speedup": target, "predicted_speedup": target * 1.01, "measured_speedup": target * 0.97,
             "trusted": trusted, "met": trusted, "tolerance": 0.05, "runtime": "onnxruntime", "batch": 64,
             "threads": 1}
    record = RunRecord(settings(scorer, plan=plan, recover=recover), status=OK,
                       results=Results(BASE, pruned, pruned, {}, {"protocol": "target_speedup"}, {}, speed=speed),
                       timings_s={"total": 1.0})
    write_record(run, record)
    return run


@pytest.mark.slow
def test_a_sweep_over_targets_and_scorers_plots_top1_against_measured_speedup(tmp_path: Path) -> None:
    for scorer, drop in (("l1", 0.0), ("qsfm", 1.0), ("fpgm", 2.0)):
        for recover in ("none", "lstsq"):
            for target in (1.5, 2.0, 2.5):
                make_speed_run(tmp_path, scorer, target, recover=recover, top1=92.0 - drop - 2 * target,
                               trusted=target < 2.5)
    make_speed_run(tmp_path, "l1", 2.0, allocation="uniform", top1=85.0)
    make_run(tmp_path, "l1", 0.5)          # measured no speed-up of its own: not in this plot
    df = report.collect_runs([tmp_path])
    written = report.write_report(df, tmp_path / "out")
    assert tmp_path / "out" / "speedup.png" in written
    assert_png(tmp_path / "out" / "speedup.png")
    fig = report.plot_speedup(df)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["resnet56 on cifar10, recovery lstsq",
                                               "resnet56 on cifar10, recovery none"]
    colors = report.criterion_colors([])
    for ax in axes:
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 3]
        assert len(lines) == 3    # one line of three targets per scorer (sensitivity planner)
        assert {line.get_color() for line in lines} == {colors[s] for s in ("l1", "qsfm", "fpgm")}
        for line in lines:
            assert list(line.get_xdata()) == pytest.approx([1.5 * 0.97, 2.0 * 0.97, 2.5 * 0.97])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"l1", "qsfm", "fpgm", "target_speedup (sensitivity)", "target_speedup (uniform)"} <= set(legend)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "measured speed-up" in md and "(2.42)?" in md and "![speedup](speedup.png)" in md
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert {"prune.target_speedup", "prune.latency_runtime", "predicted_speedup", "measured_speedup"} <= set(csv.columns)


def test_a_scorer_has_one_colour_in_every_plot() -> None:
    one, other = report.criterion_colors(["qsfm (cosine)"]), report.criterion_colors(["zzz", "qsfm (cosine)"])
    assert all(one[s] == other[s] for s in ("chip", "l1", "qsfm", "random"))
    assert one["qsfm (cosine)"] == other["qsfm (cosine)"] and len(set(other.values())) == len(other)


@pytest.mark.parametrize("field, text, expected", [
    ("top1", "NaN", "it holds NaN, which is not a JSON number"),
    ("top1", "-Infinity", "it holds -Infinity, which is not a JSON number"),
    ("top1", "1e308", "results.final.top1=1e+308; accepted: 0 to 100"),
    ("macs", "1e308", "results.final.macs=1e+308; accepted: 0 to 1e+15"),
])
def test_report_lists_a_record_with_impossible_figures_as_a_bad_run(field, text, expected, tmp_path, capsys):
    run = make_run(tmp_path / "runs", "l1", 0.5)
    make_run(tmp_path / "runs", "l1", 0.3)
    path = run / "metrics.json"
    record = json.loads(path.read_text())
    record["results"]["final"][field] = "PLACEHOLDER"
    path.write_text(json.dumps(record).replace('"PLACEHOLDER"', text))
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    console = capsys.readouterr()
    assert "1 finished run(s), 1 failed, 0 unfinished" in console.out
    assert console.err == ""                   # nothing from matplotlib either
    assert f"bad metrics.json: {expected}" in (tmp_path / "out" / "failed.csv").read_text()
