"""Experiment loggers, read back with each backend's own reader: parameters, per-step metrics, the final
record, artifacts, the run's status, and a sweep of two jobs as one experiment with two runs."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from qsfm_cli.loggers import (CSVLogger, Loggers, flatten_numeric, flatten_params, get_logger, list_loggers)

from .conftest import HANG_GUARD_S, qsfm_run_in_process

CONF = Path(__file__).resolve().parents[1] / "conf"
PARAMS = {"model": {"name": "resnet20"}, "prune": {"ratio": 0.5, "rates": [0.1, 0.2]}, "seed": 0}
RECORD = {"status": "ok", "base": {"top1": 91.5, "macs": 40_000_000}, "final": {"top1": 90.25},
          "MACs_reduction_%": 49.5, "resumed": False, "note": None, "kept": [1, 2]}
EPOCHS = [{"train/loss": 2.0, "test/top1": 50.0}, {"train/loss": 1.5, "test/top1": 60.0},
          {"train/loss": 1.0, "test/top1": 70.0}]


def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "pruned_model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def log_run(logger, run_name: str, tmp_path: Path, scale: float = 1.0) -> None:
    with logger:
        logger.start(run_name, PARAMS)
        for step, metrics in enumerate(EPOCHS):
            logger.log_metrics({k: v * scale for k, v in metrics.items()}, step=step)
        logger.log_record(RECORD)
        logger.log_artifact(artifact(tmp_path))


def test_flattening_keeps_numbers_and_scalar_params():
    assert flatten_numeric(RECORD) == {"base/top1": 91.5, "base/macs": 40_000_000.0, "final/top1": 90.25,
                                       "MACs_reduction_%": 49.5}
    assert flatten_params(PARAMS) == {"model.name": "resnet20", "prune.ratio": 0.5, "prune.rates": "[0.1, 0.2]",
                                      "seed": 0}


def test_csv_logger_writes_plain_files(tmp_path):
    run_dir = tmp_path / "run"
    logger = CSVLogger(save_dir=run_dir)
    inside = run_dir / "metrics.json"
    inside.parent.mkdir(parents=True)
    inside.write_text("{}")
    log_run(logger, "prune.ratio=0.5", tmp_path)
    logger.close("failed")                       # already closed: nothing changes
    with pytest.raises(RuntimeError, match="already started"):
        logger.start("again", {})
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log_metrics({"loss": 0.0})
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    [record] = list(csv.DictReader(open(run_dir / "csv" / "record.csv")))
    assert float(record["final/top1"]) == 90.25 and "status" not in record
    run = json.loads((run_dir / "csv" / "run.json").read_text())
    assert run["run_name"] == "prune.ratio=0.5" and run["status"] == "ok" and run["params"]["prune.ratio"] == 0.5
    copied = run_dir / "csv" / "artifacts" / "pruned_model.pt"
    assert copied.read_bytes() == b"weights" and run["artifacts"] == [str(copied.resolve())]

    second = CSVLogger(save_dir=run_dir, name="third")
    second.start("x", {})
    second.log_artifact(inside)                  # already in the run directory: listed, not copied
    assert json.loads((run_dir / "third" / "run.json").read_text())["artifacts"] == [str(inside.resolve())]
    assert not (run_dir / "third" / "artifacts").exists()


def test_steps_continue_when_not_given(tmp_path):
    logger = CSVLogger(save_dir=tmp_path)
    logger.start("run", {})
    logger.log_metrics({"loss": 1.0}, step=5)
    logger.log_metrics({"loss": 0.5, "test_top1": None})       # not measured at this step
    logger.log_metrics({"loss": 0.25, "test_top1": 80.0})
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [(r["step"], r["test_top1"]) for r in rows] == [("5", ""), ("6", ""), ("7", "80.0")]


def test_a_failing_block_closes_every_logger_as_failed(tmp_path):
    loggers = Loggers([CSVLogger(save_dir=tmp_path, name="a"), CSVLogger(save_dir=tmp_path, name="b")])
    with pytest.raises(ZeroDivisionError):
        with loggers:
            loggers.start("job", PARAMS)
            loggers.log_metrics({"loss": 1 / 1})
            1 / 0
    for name in "ab":
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["status"] == "failed" and run["params"]["model.name"] == "resnet20"
        assert [r["loss"] for r in csv.DictReader(open(tmp_path / name / "metrics.csv"))] == ["1.0"]


def test_bad_calls_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="^logger=wandb; accepted: csv, mlflow, tensorboard$"):
        get_logger("wandb")
    with pytest.raises(ValueError, match="^logger.logdir=x; accepted: logger.save_dir, logger.name$"):
        get_logger("csv", logdir="x")
    logger = get_logger("csv", save_dir=tmp_path)
    with pytest.raises(RuntimeError, match="call start"):
        logger.log_metrics({"loss": 1.0})
    with pytest.raises(ValueError, match="run name must be a non-empty string; got ''"):
        logger.start("", {})
    logger.start("run", {})
    with pytest.raises(ValueError, match="is not a file"):
        logger.log_artifact(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="logger status 'done'; accepted: ok, failed, interrupted"):
        logger.close("done")
    assert list_loggers() == ["csv", "mlflow", "tensorboard"]


def read_tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_logger_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2
    logger = get_logger("tensorboard", save_dir=tmp_path, experiment_name="exp")
    log_run(logger, "prune.ratio=0.5", tmp_path)
    run_dir = tmp_path / "exp" / "prune.ratio=0.5"
    acc = read_tensorboard(run_dir)
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert acc.Scalars("final/top1")[0].value == 90.25 and acc.Scalars("MACs_reduction_%")[0].value == 49.5
    params_text = acc.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| prune.ratio | 0.5 |" in params_text
    assert acc.Tensors("status/text_summary")[0].tensor_proto.string_val[0].decode() == "ok"
    hparams = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["model.name"].string_value == "resnet20"
    assert (run_dir / "artifacts" / "pruned_model.pt").read_bytes() == b"weights"
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["prune.ratio=0.5"]   # no extra hparams run


@pytest.mark.slow
def test_mlflow_logger_reads_back(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    store = tmp_path / "mlruns"
    logger = get_logger("mlflow", experiment_name="exp", save_dir=store)
    log_run(logger, "prune.ratio=0.5", tmp_path)
    client = MlflowClient(tracking_uri=logger.tracking_uri)
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "prune.ratio=0.5" and run.info.status == "FINISHED"
    assert run.data.params["prune.ratio"] == "0.5" and run.data.params["prune.rates"] == "[0.1, 0.2]"
    history = client.get_metric_history(logger.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert run.data.metrics["final/top1"] == 90.25 and run.data.metrics["MACs_reduction__"] == 49.5
    assert [a.path for a in client.list_artifacts(logger.run_id)] == ["pruned_model.pt"]
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(store)


@pytest.mark.slow
def test_a_sweep_is_one_experiment_with_one_run_per_job(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    jobs = {"prune.ratio=0.3,scorer=l1": 1.0, "prune.ratio=0.5,scorer=l1": 2.0}
    for job, scale in jobs.items():                       # what each job of `qsfm-run -m ...` does
        loggers = Loggers([get_logger("tensorboard", save_dir=tmp_path / "tb", experiment_name="sweep"),
                           get_logger("mlflow", experiment_name="sweep", save_dir=tmp_path / "mlruns")])
        log_run(loggers, job, tmp_path, scale)
    runs = sorted((tmp_path / "tb" / "sweep").iterdir())
    assert [r.name for r in runs] == list(jobs)
    for run_dir, scale in zip(runs, jobs.values()):
        assert read_tensorboard(run_dir).Scalars("test/top1")[-1].value == 70.0 * scale

    client = MlflowClient(tracking_uri=loggers.loggers[1].tracking_uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "sweep"]
    found = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in found) == list(jobs)
    assert {r.info.run_name: r.data.metrics["test/top1"] for r in found} == {j: 70.0 * s for j, s in jobs.items()}


@pytest.mark.parametrize("option", ["csv", "tensorboard", "mlflow"])
def test_config_group_builds_each_logger(option, tmp_path):
    pytest.importorskip({"csv": "csv", "tensorboard": "tensorboard", "mlflow": "mlflow"}[option])
    with initialize_config_dir(str(CONF), version_base="1.3"):
        many = compose("config", overrides=["logger=many_loggers"]).logger
        one = compose("config", overrides=[f"logger={option}"]).logger
    assert set(many) == {"csv", "tensorboard", "mlflow"} and list(one) == [option]
    logger = instantiate(one[option], save_dir=str(tmp_path))
    assert logger.name == option and logger.save_dir.resolve() == tmp_path.resolve()


# --- a logger that cannot start: one line, exit code 2, the run recorded as failed ---------------------------


def failed_record(run: Path) -> str:
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "failed", record
    return record["error"]


@pytest.mark.parametrize("option", ["tensorboard", "mlflow"])
def test_a_logger_on_a_file_path_is_one_line_and_a_failed_record(option, tmp_path, monkeypatch, capsys):
    pytest.importorskip(option)
    (tmp_path / "file").write_text("")
    run = tmp_path / "run"
    code, err = qsfm_run_in_process(["experiment=smoke", f"hydra.run.dir={run}", f"cache.dir={tmp_path / 'cache'}",
                                     f"logger={option}", f"logger.{option}.save_dir={tmp_path / 'file'}"],
                                    monkeypatch, capsys)
    line = f"logger.{option}.save_dir={tmp_path / 'file'}: cannot write {tmp_path / 'file'}"
    assert code == 2 and len(err) == 1 and err[0].startswith(f"qsfm-run: error: {line}"), err
    assert err[0].endswith("; accepted: a writable directory")
    assert failed_record(run).startswith(f"ValueError: {line}")
    assert not (tmp_path / "cache").exists()          # refused before the baseline


@pytest.mark.slow
def test_an_unreachable_tracker_fails_in_one_line_and_is_recorded(tmp_path):
    pytest.importorskip("mlflow")
    with socket.socket() as s:       # a local port that nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = tmp_path / "run"
    # MLflow's own defaults retried for five minutes; no MLFLOW_HTTP_* setting of this shell may change them.
    proc = subprocess.run([sys.executable, "-m", "qsfm_cli.app", "experiment=smoke", f"hydra.run.dir={run}",
                           f"cache.dir={tmp_path / 'cache'}", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP")})
    line = f"logger.mlflow.tracking_uri={uri}: the tracking server does not answer (connection refused)"
    assert proc.stderr.strip().splitlines() == [f"qsfm-run: error: {line}; start it, or run without logger=mlflow"]
    assert proc.returncode == 2
    assert failed_record(run).startswith(f"ValueError: {line}")
