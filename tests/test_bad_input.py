"""Bad input and faults: every case ends in one line naming what is wrong and a known exit code, before any
work; a finished run's record is never replaced; a killed run is told apart from a finished one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from qsfm_cli import outputs, pipeline, report
from qsfm_cli.app import build_experiment, config_dir
from qsfm_cli.record import RunRecord
from qsfm_cli.recover import list_recoveries

from .conftest import HANG_GUARD_S, qsfm_run, qsfm_run_in_process

SMOKE = ("experiment=smoke", "progress=false")


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# override -> (the one line on stderr, or its start when it ends with "...", exit code)
CASES = {
    "prune.ratio=abc": ("prune.ratio: Value 'abc' could not be converted to Float", 2),
    "finetune.epochs=abc": ("finetune.epochs: Value 'abc' could not be converted to Integer", 2),
    "finetune.lr=abc": ("finetune.lr: Value 'abc' could not be converted to Float", 2),
    "collect.num_images=abc": ("collect.num_images: Value 'abc' could not be converted to Integer", 2),
    "prune.min_channels=abc": ("prune.min_channels: Value 'abc' could not be converted to Integer", 2),
    "prune.target_macs_reduction=abc": ("prune.target_macs_reduction: Value 'abc' could not be converted to Float",
                                        2),
    "seed=abc": ("seed: Value 'abc' could not be converted to Integer", 2),
    "seed=2**70": ("seed: Value '2**70' could not be converted to Integer", 2),
    f"seed={2 ** 70}": (f"seed={2 ** 70}; accepted: a whole number in [0, 2**63)", 2),
    "prune.rates=0.5": ("prune.rates has 1 entries; this model accepts ...", 2),
    "model.pretrained=maybe": ("model.pretrained: Value 'maybe' is not a valid bool (type str)", 2),
    "eval.batch_size=0": ("eval.batch_size=0; accepted: >= 1", 2),
    "eval.latency_repeats=0": ("eval.latency_repeats=0; accepted: >= 1", 2),
    "eval.latency_batches=[0]": ("eval.latency_batches=[0]; accepted: batch sizes >= 1 ...", 2),
    "finetune.lr=inf": ("finetune.lr=inf; accepted: a finite number", 2),
    "prune.threshold=abc": ("prune.threshold: Value 'abc' could not be converted to Float", 2),
    "prune.threshold=nan": ("prune.threshold=nan; accepted: a finite number", 2),
    "prune.min_channels=1000": ("prune.min_channels=1000 leaves nothing to prune: the largest channel set of "
                                "prune.scope=default has 16 channels; accepted: 1 to 15", 2),
    "prune.compensate=lstsq": (f"prune.compensate is now recover=<{'|'.join(list_recoveries())}|...>", 2),
    "prune.ridge=0.1": ("prune.ridge is now recover.ridge", 2),
    "prune.bn_recalibration=512": ("prune.bn_recalibration is now recover.bn_images", 2),
    "prune.iterative_steps=2": ("prune.iterative_steps is now recover.iterative_steps", 2),
    "finetune.amp=bf16": ("finetune.amp is now execution.amp", 2),
    "dataset.mean=[0.5,0.5,0.5]": ("dataset.mean is now model.mean", 2),
    "model.std=[0,1,1]": ("model.std=[0.0, 1.0, 1.0]; accepted: three values > 0, or null (the weights' card, else "
                          "the dataset's own)", 2),
    "scorer=ssim": ("In 'config': Could not find 'scorer/ssim'; available options in 'scorer': chip, ...", 2),
    # every option that sizes an allocation, bounded by the memory available (qsfm_cli.limits)
    "eval.latency_batches=[1,100000000]": ("eval.latency_batches=[1, 100000000]; accepted: at most ...", 2),
    "eval.batch_size=100000000": ("eval.batch_size=100000000; accepted: at most ...", 2),
    "collect.batch_size=100000000": ("collect.batch_size=100000000; accepted: at most ...", 2),
    "baseline.recipe.batch_size=100000000": ("baseline.recipe.batch_size=100000000; accepted: at most ...", 2),
    "recover.bn_images=8 recover.bn_batch_size=100000000": ("recover.bn_batch_size=100000000; accepted: at most ...",
                                                          2),
    "model.name=tv_resnet5": ("model.name=tv_resnet5; accepted: tv_<a model of torchvision.models.list_models()>: "
                              "torchvision has no model 'resnet5' (close names: tv_resnet50, ...", 2),
    "dataset.seed=/tmp/a b": ("override 'b' is not key=value: a value holding a space must be quoted, as in "
                              "'dataset.seed=/tmp/a b'", 2),
    "dataset.train_size=1000000000": ("dataset.train_size=1000000000; accepted: at most ...", 2),
    # every option that counts images: no more than the split holds
    "collect.num_images=100000": ("collect.num_images=100000; accepted: 1 to 512 (the training split of dataset=fake "
                                  "holds 512 images)", 2),
    "recover.bn_images=100000": ("recover.bn_images=100000; accepted: 1 to 512 (the training split of dataset=fake "
                                 "holds 512 images)", 2),
    "recover=sequential recover.images=100000": ("recover.images=100000; accepted: 1 to 512 (the training split of "
                                                 "dataset=fake holds 512 images)", 2),
    "export.onnx=true export.check_images=1000": ("export.check_images=1000; accepted: 1 to 256 (the test split of "
                                                  "dataset=fake holds 256 images)", 2),
}


# The script that runs qsfm-run once per case, in one process of its own: its imports cost seconds, the
# cases milliseconds. Each case is a whole ``qsfm-run`` (``main()`` with its own argv and stderr).
DRIVER = """
import contextlib, io, json, sys
from hydra.core.global_hydra import GlobalHydra
from qsfm_cli.app import main

cases, out, results = json.loads(sys.argv[1]), sys.argv[2], {}
for name, argv in cases.items():
    sys.argv, err, code = ["qsfm-run", *argv], io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
    GlobalHydra.instance().clear()
    results[name] = {"returncode": code, "stderr": err.getvalue()}
with open(out, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("cases")
    (tmp / "file").write_text("")
    argv = {name: [*SMOKE, f"hydra.run.dir={tmp / 'runs' / str(i)}", f"cache.dir={tmp / 'cache'}", *name.split(" ")]
            for i, name in enumerate(CASES)}
    argv["unwritable run dir"] = [*SMOKE, f"hydra.run.dir={tmp / 'file' / 'run'}"]
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv), str(tmp / "results.json")], cwd=tmp,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, {name: SimpleNamespace(**r) for name, r in json.loads((tmp / "results.json").read_text()).items()}


@pytest.mark.slow
@pytest.mark.parametrize("override", list(CASES))
def test_bad_value_is_one_line_before_any_work(override: str, cli_cases: tuple[Path, dict]) -> None:
    tmp, results = cli_cases
    expected, code = CASES[override]
    proc = results[override]
    line = one_line(proc)
    if expected.endswith("..."):
        assert line.startswith(f"qsfm-run: error: {expected[:-3]}"), line
    else:
        assert line == f"qsfm-run: error: {expected}"
    assert proc.returncode == code
    assert not (tmp / "cache").exists()   # no baseline trained, nothing collected by any case


@pytest.mark.slow
def test_unwritable_run_dir_is_one_line(cli_cases: tuple[Path, dict]) -> None:
    tmp, results = cli_cases
    proc = results["unwritable run dir"]
    assert one_line(proc).startswith(f"qsfm-run: error: cannot write {tmp / 'file'}")
    assert proc.returncode == 2


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    proc = qsfm_run(*SMOKE, f"hydra.run.dir={tmp / 'run'}", f"cache.dir={tmp / 'cache'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
def test_rerun_into_a_finished_run_dir_is_refused(finished: Path) -> None:
    before = (finished / "metrics.json").read_bytes()
    proc = qsfm_run(*SMOKE, f"hydra.run.dir={finished}", "resume=true", "seed=1", "finetune=short",
                    cwd=finished.parent)
    assert one_line(proc) == (f"qsfm-run: error: {finished} holds a finished run (its metrics.json says status "
                              f"ok), which a rerun would overwrite; choose another run directory (hydra.run.dir=...)")
    assert proc.returncode == 2
    assert (finished / "metrics.json").read_bytes() == before
    assert not (finished / "train_state.pt").exists()


@pytest.mark.slow
def test_resume_with_another_seed_is_refused_before_any_work(tmp_path: Path) -> None:
    run = tmp_path / "run"           # an unfinished run: a fine-tuning state, no finished record
    run.mkdir()
    torch.save({"recipe": {}, "seed": 0}, run / "train_state.pt")
    proc = qsfm_run(*SMOKE, f"hydra.run.dir={run}", f"cache.dir={tmp_path / 'cache'}", "resume=true", "seed=1",
                    "finetune=short", cwd=tmp_path)
    line = one_line(proc)
    assert line.startswith(f"qsfm-run: error: cannot resume from {run / 'train_state.pt'}: it was written with "
                           "a different recipe (")
    assert "seed: 0 -> 1" in line
    assert proc.returncode == 2
    assert not (tmp_path / "cache").exists()    # refused before the baseline, collection or anything else


def test_an_unexpected_error_is_one_line_and_the_traceback_goes_to_the_log(tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from qsfm_cli import app

    def fail(cfg):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(app, "run", fail)
    monkeypatch.setattr(sys, "argv", ["qsfm-run", *SMOKE, f"hydra.run.dir={tmp_path / 'run'}"])
    try:
        with pytest.raises(SystemExit) as stop:
            app.main()
    finally:
        GlobalHydra.instance().clear()
    assert stop.value.code == 1
    console = capsys.readouterr()
    log_file = tmp_path / "run" / "qsfm_run.log"
    assert console.err.strip().splitlines() == [
        f"qsfm-run: error: RuntimeError: disk on fire (traceback in {log_file})"]
    assert "Traceback" not in console.out
    assert "Traceback" in log_file.read_text() and "disk on fire" in log_file.read_text()


@pytest.mark.slow
def test_a_value_holding_a_slash_stays_inside_the_sweep_dir(tmp_path: Path) -> None:
    sweep = tmp_path / "a" / "sweep"
    proc = qsfm_run("-m", *SMOKE, f"hydra.sweep.dir={sweep}", "scorer.name=../../../escaped,../x", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["sweep"]
    jobs = sorted(p.parent.name for p in sweep.rglob("metrics.json"))
    assert jobs == ["experiment=smoke,scorer.name=..%2F..%2F..%2Fescaped", "experiment=smoke,scorer.name=..%2Fx"]
    # every job ran; the sweep ends with one line counting the failures
    assert proc.stderr.strip().splitlines()[-1] == (
        f"qsfm-run: error: 2 of 2 jobs failed (see {sweep}/{jobs[0]}/metrics.json; qsfm-report {sweep} lists them "
        f"all)")
    assert proc.returncode == 1


def smoke_experiment(tmp_path: Path, cache: Path):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*SMOKE, f"cache.dir={cache}"])
    return build_experiment(cfg, tmp_path / "run")


def test_record_says_running_from_the_start_and_failed_after(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def killed(*args, **kwargs):
        seen["status"] = json.loads((tmp_path / "run" / "metrics.json").read_text())["status"]
        raise RuntimeError("killed")

    monkeypatch.setattr(pipeline, "load_baseline", killed)
    with pytest.raises(RuntimeError):
        pipeline.run_experiment(smoke_experiment(tmp_path, tmp_path / "cache"))
    assert seen["status"] == "running"
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (record["status"], record["error"]) == ("failed", "RuntimeError: killed")
    assert record["settings"]["scorer"]["name"] == "l1"


@pytest.mark.slow
def test_results_are_written_before_the_model(finished: Path, tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def save(path, model):
        seen["status"] = outputs.read_status(path.parent)
        seen["csv"] = (path.parent / outputs.RESULTS_FILE).is_file()
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "save_pruned", save)
    with pytest.raises(OSError):
        pipeline.run_experiment(smoke_experiment(tmp_path, finished.parent / "cache"))   # the baseline is cached
    assert seen == {"status": "ok", "csv": True}
    # the finished record is not replaced by the failure that came after it
    assert outputs.read_status(tmp_path / "run") == "ok"


# --- qsfm-report ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["null", "[1, 2, 3]", '"ok"', "{"])
def test_report_lists_a_metrics_file_that_is_not_a_record_as_a_bad_run(text: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text(text)
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "0 finished run(s), 1 failed, 0 unfinished" in capsys.readouterr().out
    assert "bad metrics.json" in (tmp_path / "out" / "failed.csv").read_text()


def report_exit(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        report.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return exit_.value.code, err[0]


@pytest.mark.slow
def test_report_layers_on_a_failed_run_says_it_failed(finished: Path, tmp_path: Path, capsys) -> None:
    failed = tmp_path / "failed"
    outputs.write_record(failed, RunRecord(None, status="failed", error="ValueError: bad"))
    code, line = report_exit([str(finished), str(failed), "--layers", str(failed), "--out", str(tmp_path / "out")],
                             capsys)
    assert code == 2 and line == (f"qsfm-report: error: run '{failed}' failed (ValueError: bad): its kept "
                                  f"channels are known only once it has finished")


@pytest.mark.slow
def test_report_into_an_unwritable_folder_is_one_line(finished: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    code, line = report_exit([str(finished), "--out", str(tmp_path / "file" / "out")], capsys)
    assert code == 2 and line.startswith(f"qsfm-report: error: cannot write {tmp_path / 'file'}")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("state", ["truncated", "pickles code", "not a state"])
def test_resume_over_an_unreadable_state_is_one_line_and_a_failed_record(state: str, tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    path = run / "train_state.pt"
    if state == "truncated":
        torch.save({"recipe": {}, "seed": 0, "model": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        torch.save(Payload() if state == "pickles code" else [1, 2], path)
    code, err = qsfm_run_in_process([*SMOKE, f"hydra.run.dir={run}", f"cache.dir={tmp_path / 'cache'}",
                                     "resume=true", "finetune=short"], monkeypatch, capsys)
    why = {"truncated": "truncated or corrupt", "pickles code": "it pickles objects other than tensors",
           "not a state": "no recipe and seed"}[state]
    line = f"cannot resume from {path}: not a fine-tuning state of qsfm-run ({why}); delete it, or set resume=false " \
           f"to start over"
    assert (code, err) == (2, [f"qsfm-run: error: {line}"])
    record = json.loads((run / "metrics.json").read_text())
    assert (record["status"], record["error"]) == ("failed", f"ValueError: {line}")
    assert not (tmp_path / "cache").exists()


def test_a_cache_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "file").write_text("")
    run = tmp_path / "run"
    code, err = qsfm_run_in_process([*SMOKE, f"hydra.run.dir={run}", f"cache.dir={tmp_path / 'file'}"], monkeypatch,
                                    capsys)
    line = f"cache.dir={tmp_path / 'file'}: {tmp_path / 'file'} is a file; accepted: a writable directory"
    assert (code, err) == (2, [f"qsfm-run: error: {line}"])
    assert json.loads((run / "metrics.json").read_text())["error"] == f"ValueError: {line}"
