"""qsfm-report on hand-made run directories (the layout qsfm-run writes)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from qsfm_cli import report
from qsfm_cli.papers import REFERENCES, references_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE = {"top1": 93.0, "top5": 99.5, "macs": 125_000_000, "params": 850_000, "latency_ms": {"b1": 2.0, "b64": 40.0}}


def _measured(top1: float, keep: float) -> dict:
    return {"top1": top1, "top5": 99.0, "macs": int(BASE["macs"] * keep), "params": int(BASE["params"] * keep),
            "latency_ms": {"b1": 2.0 * keep, "b64": 40.0 * keep}}


def make_run(root: Path, scorer: str, ratio: float, *, model: str = "resnet56", top1: float = 90.0,
             finetune_epochs: int = 0, seed: int = 0) -> Path:
    """A finished run as qsfm-run writes it; the folder name is Hydra's override_dirname."""
    run = root / f"prune.ratio={ratio},scorer={scorer},seed={seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- scorer={scorer}\n- prune.ratio={ratio}\n- seed={seed}\n")
    keep = 1.0 - ratio * 0.9
    pruned = _measured(top1, keep)
    final = _measured(top1 + 1.0, keep) if finetune_epochs else pruned
    metrics = {
        "status": "ok", "model": model, "dataset": "cifar10", "scorer": scorer, "scorer_options": {},
        "protocol": "ratio", "ratio": ratio, "rates": None, "threshold": None, "target_macs_reduction": None,
        "compensate": "none", "seed": seed, "finetune_epochs": finetune_epochs,
        "base": BASE, "pruned": pruned, "final": final,
        "kept_channels": {f"layer{i}.conv1": {"kept": round(16 * (1 - ratio)), "total": 16} for i in range(1, 4)},
        "reference": None,
        "timings_s": {"collect": 1.0, "score": 2.0, "prune": 0.5, "finetune": 0.0, "evaluate": 1.0, "total": 5.0},
        "cache": {"stats": "miss", "orders": "miss"},
        "config": {"model": {"name": model}, "scorer": {"name": scorer}, "prune": {"ratio": ratio}, "seed": seed},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    if finetune_epochs:
        pd.DataFrame({"epoch": range(1, finetune_epochs + 1), "lr": 0.01, "loss": [1.0 / e for e in range(1, finetune_epochs + 1)],
                      "train_top1": 80.0, "test_top1": [top1 + e / finetune_epochs for e in range(1, finetune_epochs + 1)],
                      "seconds": 1.0}).to_csv(run / "train_log.csv", index=False)
    return run


def make_failed(root: Path, scorer: str, ratio: float) -> Path:
    run = root / f"prune.ratio={ratio},scorer={scorer}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- scorer={scorer}\n- prune.ratio={ratio}\n")
    (run / "metrics.json").write_text(json.dumps({
        "status": "failed", "error": f"ValueError: prune.ratio must be in [0, 1), got {ratio}",
        "scorer": scorer, "config": {"scorer": {"name": scorer}, "prune": {"ratio": ratio}}}))
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


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_collect_sorts_by_model_scorer_ratio_and_keeps_failed_apart(sweep: Path) -> None:
    df = report.collect_runs([sweep])
    ok = report.ok_runs(df)
    assert list(zip(ok["scorer"], ok["ratio"])) == [("l1", 0.3), ("l1", 0.5), ("qsfm", 0.3), ("qsfm", 0.5)]
    failed = report.failed_runs(df)
    assert len(failed) == 1 and "got 1.5" in failed.iloc[0]["error"]
    assert failed.iloc[0]["overrides"] == "scorer=hrank,prune.ratio=1.5"
    assert failed.iloc[0]["ratio"] == 1.5  # a failed run's settings come from its config
    # the run label is what varied in the sweep (Hydra's override_dirname)
    assert ok.iloc[0]["run"] == "prune.ratio=0.3,scorer=l1,seed=0"
    assert ok.iloc[2]["top1_drop"] == pytest.approx(2.0) and ok.iloc[2]["time_score_s"] == 2.0


def test_write_report_writes_tables_and_valid_pngs(sweep: Path, tmp_path: Path) -> None:
    df = report.collect_runs([sweep])
    written = report.write_report(df, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"results.csv", "failed.csv", "pareto.png", "kept_channels.png", "results.md"}
    for name in ("pareto.png", "kept_channels.png"):
        assert_png(tmp_path / "out" / name)
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(csv["scorer"]) == ["l1", "l1", "qsfm", "qsfm"] and "MACs_reduction_%" in csv
    assert len(pd.read_csv(tmp_path / "out" / "failed.csv")) == 1

    md = (tmp_path / "out" / "results.md").read_text()
    assert "4 finished run(s), 1 failed." in md
    results, failed = md.split("## Failed runs")
    assert results.count("| prune.ratio=") == 4 and "hrank" not in results.split("## Published")[0]
    assert "| prune.ratio=0.3,scorer=qsfm,seed=0 | resnet56 | qsfm | ratio | 0.3 | none | 0 | 93 | 91 |" in results
    assert "got 1.5" in failed and "scorer=hrank,prune.ratio=1.5" in failed
    # the ResNet-56 papers are listed with their source
    assert "HRank, Lin et al., CVPR 2020" in md and "62.72" in md and "QSFM, Wang et al. 2021" in md
    assert "![pareto](pareto.png)" in md
    assert "Job time summed over these runs: 20.0 s (collect 4.0 s, score 8.0 s," in md
    assert "other (baseline, loading) 2.0 s)" in md


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
    fig = report.plot_pareto(report.collect_runs([root]))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["resnet20 on cifar10", "resnet56 on cifar10"]
    line = axes[1].get_lines()[0]  # the l1 line: one point, mean of the two seeds
    assert list(line.get_ydata()) == pytest.approx([-(93.0 - 81.0)])
    legend = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert "l1" in legend and any(t.startswith("CHIP, Sui et al.") for t in legend)
    assert not any("HRank" in t for t in (t.get_text() for t in axes[0].get_legend().get_texts()))


def test_layers_picks_the_run_and_rejects_a_run_without_channels(sweep: Path, tmp_path: Path) -> None:
    df = report.collect_runs([sweep])
    chosen = next(sweep.rglob("prune.ratio=0.3,scorer=qsfm,seed=0"))
    report.write_report(df, tmp_path / "out", layers_run=chosen)
    assert_png(tmp_path / "out" / "kept_channels.png")
    failed = next(sweep.rglob("prune.ratio=1.5,scorer=hrank"))
    with pytest.raises(report.ReportError, match="has no kept_channels"):
        report.write_report(df, tmp_path / "out2", layers_run=failed)


def test_bad_paths_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(report.ReportError, match="no such run or sweep directory"):
        report.collect_runs([tmp_path / "missing"])
    with pytest.raises(report.ReportError, match="no metrics.json found"):
        report.collect_runs([tmp_path])


def test_unreadable_metrics_is_listed_as_failed(tmp_path: Path) -> None:
    make_run(tmp_path, "l1", 0.5)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    df = report.collect_runs([tmp_path])
    assert len(report.ok_runs(df)) == 1
    assert report.failed_runs(df).iloc[0]["error"].startswith("unreadable metrics.json")


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
    assert "final.top1" in metrics_part and "91.0" in metrics_part and "88.0" in metrics_part
    assert "kept_channels.kept/total" in metrics_part


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
