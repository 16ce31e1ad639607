"""The pipeline wired to deployment and tracking: paired latency in the record, results.csv and results.md;
the ONNX export option; the loggers in a run and in a sweep, read back with each backend's own reader."""
from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from qsfm_cli import report
from qsfm_cli.export import ExportSpec, check_onnx
from qsfm_cli.latency import summarize_pair
from qsfm_cli.outputs import load_pruned, results_row, write_record
from qsfm_cli.pipeline import EvalSpec
from qsfm_cli.record import OK, Results, RunRecord

from .conftest import qsfm_run
from .test_loggers import read_tensorboard
from .test_report import BASE, _measured, settings


def paired_record(base_times: list[float], pruned_times: list[float]) -> RunRecord:
    pruned = _measured(90.0, 0.5)
    pairs = [summarize_pair(base_times, pruned_times, runtime=runtime, batch=1)
             for runtime in ("torch", "onnxruntime")]
    latency = {f"{p.runtime}/b{p.batch}": p.to_dict() for p in pairs}
    results = Results(BASE, pruned, pruned, {}, {"protocol": "ratio"}, {}, latency)
    return RunRecord(settings(), status=OK, results=results)


def test_results_row_has_speedup_trust_columns_per_runtime():
    quiet = paired_record([2.0, 2.0, 2.1, 2.0], [1.0, 1.0, 1.05, 1.0])
    busy = paired_record([2.0, 9.0, 2.1, 30.0], [1.0, 1.0, 1.05, 1.0])
    for record, trusted in ((quiet, True), (busy, False)):
        row = results_row(record)
        pair = record.results.latency["torch/b1"]
        assert row["speedup_b1"] == round(pair["speedup"], 3)
        assert row["speedup_trusted_b1"] is trusted and row["onnxruntime_speedup_trusted_b1"] is trusted
        assert row["onnxruntime_speedup_b1"] == round(record.results.latency["onnxruntime/b1"]["speedup"], 3)
        assert row["latency_spread_b1"] == round(max(pair["base_spread"], pair["pruned_spread"]), 3)
    assert RunRecord.from_dict(busy.to_dict()) == busy


def test_report_marks_untrusted_speedups(tmp_path):
    for name, times in (("quiet", [2.0, 2.0, 2.1, 2.0]), ("busy", [2.0, 9.0, 2.1, 30.0])):
        record = paired_record(times, [1.0, 1.0, 1.05, 1.0])
        record = replace(record, settings=settings(ratio=0.3 if name == "quiet" else 0.6))
        write_record(tmp_path / name, record)
    text = report.results_markdown(report.collect_runs([tmp_path]))
    busy = round(paired_record([2.0, 9.0, 2.1, 30.0], [1.0, 1.0, 1.05, 1.0]).results.latency["torch/b1"]
                 ["speedup"], 2)
    quiet_row = next(line for line in text.splitlines() if line.startswith("| quiet"))
    busy_row = next(line for line in text.splitlines() if line.startswith("| busy"))
    assert f"({busy:.2f})?" in busy_row and "?" not in quiet_row
    assert "untrusted speed-up" in text


# ------------------------------------------------------------------------------- qsfm-run with loggers

def loggers_run(root: Path, *overrides: str, sweep: bool) -> subprocess.CompletedProcess:
    """``qsfm-run experiment=smoke logger=many_loggers`` with every store under ``root``."""
    where = f"hydra.sweep.dir={root / 'runs'}" if sweep else f"hydra.run.dir={root / 'runs' / 'single'}"
    return qsfm_run(*(["-m"] if sweep else []), "experiment=smoke", "logger=many_loggers", where,
                    f"cache.dir={root / 'cache'}", f"logger.tensorboard.save_dir={root / 'tb'}",
                    f"logger.mlflow.save_dir={root / 'mlruns'}", *overrides, cwd=root)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two jobs, fine-tuned 2 epochs, exported to ONNX and timed in both runtimes: shared by the tests below."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("wired_sweep")
    proc = loggers_run(root, "finetune=short", "finetune.epochs=2", "export.onnx=true",
                       "eval.runtimes=[torch,onnxruntime]", "prune.ratio=0.3,0.5", sweep=True)
    assert proc.returncode == 0, proc.stderr
    jobs = {d.name: d for d in (root / "runs").iterdir() if (d / "metrics.json").is_file()}
    return root, jobs


def mlflow_runs(root: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(root / 'mlruns').resolve() / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "qsfm"]
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


@pytest.mark.slow
def test_sweep_is_one_experiment_with_one_tracked_run_per_job(sweep):
    root, jobs = sweep
    assert sorted(name.rsplit(",", 1)[1] for name in jobs) == ["prune.ratio=0.3", "prune.ratio=0.5"]
    assert not any("logger" in name for name in jobs)        # where the trackers write splits no run
    client, runs = mlflow_runs(root)
    assert sorted(runs) == sorted(jobs)
    assert sorted(p.name for p in (root / "tb" / "qsfm").iterdir()) == sorted(jobs)
    for name, run_dir in jobs.items():
        record = RunRecord.from_dict(json.loads((run_dir / "metrics.json").read_text()))
        log = pd.read_csv(run_dir / "train_log.csv")
        run = runs[name]
        assert run.info.status == "FINISHED"
        ratio = name.rsplit("=", 1)[1]
        assert run.data.params["prune.ratio"] == ratio and run.data.params["finetune.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "finetune/loss")
        assert sorted((m.step, m.value) for m in history) == list(zip(log["epoch"], log["loss"]))
        assert run.data.metrics["results/final/top1"] == record.results.final.top1
        assert run.data.metrics["results/latency/torch/b1/speedup"] == record.results.latency["torch/b1"]["speedup"]
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["pruned_model.onnx",
                                                                                 "pruned_model.pt"]

        acc = read_tensorboard(root / "tb" / "qsfm" / name)
        events = acc.Scalars("finetune/loss")
        assert [e.step for e in events] == list(log["epoch"])
        assert [e.value for e in events] == pytest.approx(list(log["loss"]), rel=1e-6)
        assert acc.Scalars("results/final/top1")[0].value == pytest.approx(record.results.final.top1)
        assert "| prune.ratio |" in acc.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
        assert acc.Tensors("status/text_summary")[0].tensor_proto.string_val[0].decode() == "ok"
        assert (root / "tb" / "qsfm" / name / "artifacts" / "pruned_model.onnx").is_file()

        tracked = json.loads((run_dir / "csv" / "run.json").read_text())
        assert tracked["status"] == "ok" and tracked["params"]["prune.ratio"] == float(ratio)
        assert len(pd.read_csv(run_dir / "csv" / "metrics.csv")) == 2


@pytest.mark.slow
def test_onnx_export_is_written_checked_and_recorded(sweep):
    _, jobs = sweep
    for run_dir in jobs.values():
        record = json.loads((run_dir / "metrics.json").read_text())
        check = record["export"]
        assert check["ok"] and check["onnx_file"] == str(run_dir / "pruned_model.onnx")
        assert check["rel_error"] <= check["tolerance"] and check["images"] == 8
        model = load_pruned(run_dir / "pruned_model.pt")
        assert check_onnx(model, run_dir / "pruned_model.onnx", torch.randn(3, 3, 32, 32))["ok"]


@pytest.mark.slow
def test_results_csv_has_speedup_trust_columns_for_each_runtime(sweep):
    _, jobs = sweep
    for run_dir in jobs.values():
        row = pd.read_csv(run_dir / "results.csv").iloc[0]
        record = RunRecord.from_dict(json.loads((run_dir / "metrics.json").read_text()))
        for key, pair in record.results.latency.items():
            prefix = "" if pair["runtime"] == "torch" else "onnxruntime_"
            assert row[f"{prefix}speedup_b{pair['batch']}"] == round(pair["speedup"], 3)
            assert bool(row[f"{prefix}speedup_trusted_b{pair['batch']}"]) == pair["trusted"]
        assert sorted(record.results.latency) == ["onnxruntime/b1", "onnxruntime/b8", "torch/b1", "torch/b8"]


@pytest.mark.slow
def test_single_run_is_tracked_by_every_logger(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    proc = loggers_run(tmp_path, "prune.ratio=0.4", sweep=False)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "single"
    record = RunRecord.from_dict(json.loads((run_dir / "metrics.json").read_text()))
    client, runs = mlflow_runs(tmp_path)
    [(name, run)] = runs.items()
    assert name == "experiment=smoke,prune.ratio=0.4" and run.info.status == "FINISHED"
    assert run.data.params["model.name"] == record.settings.model["name"] and run.data.metrics["results/base/top1"] == record.results.base.top1
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["pruned_model.pt"]
    acc = read_tensorboard(tmp_path / "tb" / "qsfm" / name)
    assert acc.Scalars("results/final/macs")[0].value == record.results.final.macs
    assert json.loads((run_dir / "csv" / "run.json").read_text())["status"] == "ok"
    assert not (run_dir / "pruned_model.onnx").exists() and record.export is None


@pytest.mark.parametrize("make, message", [
    (lambda: EvalSpec(runtimes=("onnx",)), "eval.runtimes=['onnx']; accepted: one or more of torch, onnxruntime"),
    (lambda: EvalSpec(runtimes=()), "eval.runtimes=[]; accepted:"),
    (lambda: EvalSpec(latency_repeats=2), "eval.latency_repeats=2; accepted: >= 3"),
    (lambda: ExportSpec(check_images=0), "export.check_images=0; accepted: >= 1"),
])
def test_bad_eval_and_export_values_are_one_clear_error(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)
