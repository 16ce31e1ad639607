"""Sweeps end to end: Hydra multiruns of ``qsfm-run`` on synthetic data, the report over them, launchers.

Each ``qsfm-run`` start costs seconds of imports, so the module runs two sweeps (one sequential, one
parallel) and every test reads their outputs.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from qsfm_cli import report
from qsfm_cli.app import config_dir

from .conftest import HANG_GUARD_S, assert_png, qsfm_run


def sweep(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return qsfm_run("-m", "experiment=smoke", *overrides, cwd=cwd)


def job_dirs(sweep: Path) -> dict[str, Path]:
    return {d.name: d for d in sweep.iterdir() if (d / "metrics.json").is_file()}


def metrics_of(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """2x2 grid, sequential: scorer {qsfm, l1} x prune.threshold {unset, 0.5}.

    l1 has no threshold rule, so exactly one cell (l1, threshold 0.5) fails, with a clear error.
    """
    tmp = tmp_path_factory.mktemp("grid")
    proc = sweep(tmp, "scorer=qsfm,l1", "prune.threshold=null,0.5",
                 f"hydra.sweep.dir={tmp / 'sweep'}", f"cache.dir={tmp / 'cache'}")
    return tmp / "sweep", proc


@pytest.fixture(scope="module")
def grid(grid_run: tuple[Path, subprocess.CompletedProcess]) -> Path:
    return grid_run[0]


@pytest.fixture(scope="module", params=[("hydra/launcher=joblib_local",),
                                        ("hydra/launcher=gpu_shared", "hydra.launcher.n_jobs=2", "device=auto")],
                ids=["joblib_local", "gpu_shared"])
def parallel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A ratio sweep of QSFM through a joblib launcher, two jobs at once, on a fresh cache; ``gpu_shared``
    (several jobs per GPU) with the per-job device choice it is meant for, which is the CPU here."""
    tmp = tmp_path_factory.mktemp("parallel")
    proc = sweep(tmp, *request.param, "scorer=qsfm", "prune.ratio=0.3,0.5",
                 f"hydra.sweep.dir={tmp / 'sweep'}", f"cache.dir={tmp / 'cache'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "sweep", proc.stdout + proc.stderr


@pytest.mark.slow
def test_grid_writes_one_run_dir_per_job_named_by_what_varied(grid: Path) -> None:
    assert set(job_dirs(grid)) == {
        f"experiment=smoke,prune.threshold={t},scorer={s}" for t in ("null", "0.5") for s in ("qsfm", "l1")}


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_sweep_goes_on(grid_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    grid, proc = grid_run
    failed = metrics_of(job_dirs(grid)["experiment=smoke,prune.threshold=0.5,scorer=l1"])
    assert failed["status"] == "failed"
    assert failed["error"].startswith("ValueError: prune.threshold needs a scorer with a threshold rule")
    assert failed["config"]["prune"]["threshold"] == 0.5 and failed["settings"]["prune"]["threshold"] == 0.5
    # every job ran, then the sweep ended with one line naming the count and where to look
    assert sum(metrics_of(job)["status"] == "ok" for job in job_dirs(grid).values()) == 3
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"qsfm-run: error: 1 of 4 jobs failed (see {grid}/experiment=smoke,prune.threshold=0.5,scorer=l1/"
        f"metrics.json; qsfm-report {grid} lists them all)")


@pytest.mark.slow
def test_report_lists_three_runs_one_failure_and_valid_plots(grid: Path, tmp_path: Path) -> None:
    assert report.main([str(grid), "--out", str(tmp_path)]) == 0
    df = report.collect_runs([grid])
    ok, failed = report.ok_runs(df), report.failed_runs(df)
    assert sorted(zip(ok["scorer"], ok["prune.threshold"].fillna(-1))) == [("l1", -1), ("qsfm", -1), ("qsfm", 0.5)]
    assert list(failed["scorer"]) == ["l1"] and "threshold rule" in failed.iloc[0]["error"]
    md = (tmp_path / "results.md").read_text()
    assert "3 finished run(s), 1 failed, 0 unfinished." in md and "## Failed runs" in md
    for name in ("pareto.png", "kept_channels.png"):
        assert_png(tmp_path / name)


@pytest.mark.slow
def test_jobs_differing_only_in_threshold_reuse_statistics_and_scores(grid: Path) -> None:
    jobs = job_dirs(grid)
    first = jobs["experiment=smoke,prune.threshold=null,scorer=qsfm"]
    second = jobs["experiment=smoke,prune.threshold=0.5,scorer=qsfm"]
    assert metrics_of(first)["cache"] == {"stats": "miss", "orders": "miss", "recovered": "miss"}
    assert metrics_of(second)["cache"] == {"stats": "hit", "orders": "hit", "recovered": "miss"}
    log = (second / "qsfm_run.log").read_text()
    assert "cache hit: stats/" in log and "cache miss: stats/" not in log


@pytest.mark.slow
def test_joblib_runs_the_ratio_sweep_in_parallel_and_collects_once(parallel: tuple[Path, str]) -> None:
    sweep, output = parallel
    jobs = list(job_dirs(sweep).values())
    assert len(jobs) == 2 and all(metrics_of(j)["status"] == "ok" for j in jobs)
    assert sorted(metrics_of(j)["config"]["prune"]["ratio"] for j in jobs) == [0.3, 0.5]   # each in its own dir
    assert "Joblib.Parallel(n_jobs=2" in output
    # both jobs were running at once: each started (Hydra wrote its config) before the other finished
    spans = [((j / ".hydra" / "config.yaml").stat().st_mtime, (j / "metrics.json").stat().st_mtime) for j in jobs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]
    # the cache lock made the later job wait for the statistics instead of collecting them again
    assert sorted(metrics_of(j)["cache"]["stats"] for j in jobs) == ["hit", "miss"]
    logs = [(j / "qsfm_run.log").read_text() for j in jobs]
    assert sum("cache hit: stats/" in log for log in logs) == 1


@pytest.fixture
def no_submission(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Let submitit build its SLURM executor here (no srun) and capture the job array instead of submitting."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    captured: dict = {}

    def capture(executor, fn, *job_args):
        captured.update(executor=executor, job_args=job_args)
        return []

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    return captured


def sbatch_of(no_submission: dict, sweep_dir: Path, overrides: list[str], jobs: list[list[str]]) -> str:
    """The sbatch script the launcher composed from ``overrides`` writes for ``jobs`` (captured, not
    submitted)."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"hydra.sweep.dir={sweep_dir}", "experiment=smoke"],
                      return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch(jobs, 0) == []
    return no_submission["executor"]._executor._make_submission_file_text("python -u job.py", "uid")


def test_slurm_launcher_config_composes_into_sbatch_parameters(no_submission: dict, tmp_path: Path) -> None:
    sbatch = sbatch_of(no_submission, tmp_path, ["hydra/launcher=slurm_gpu", "hydra.launcher.timeout_min=30"],
                       [["scorer=qsfm", "prune.ratio=0.3"], ["scorer=qsfm", "prune.ratio=0.5"]])
    executor = no_submission["executor"]._executor
    for line in ("--partition=gpu", "--gpus-per-node=1", "--time=30", "--cpus-per-task=8", "--mem=32GB",
                 "--job-name=qsfm_run", f"--output={tmp_path}/.submitit/"):
        assert f"#SBATCH {line}" in sbatch
    assert executor.parameters["array_parallelism"] == 32
    assert list(no_submission["job_args"][0]) == [["scorer=qsfm", "prune.ratio=0.3"],
                                                  ["scorer=qsfm", "prune.ratio=0.5"]]


def test_plugins_own_launcher_configs_compose() -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=a100",
                                             "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
        joblib = compose("config", overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"],
                         return_hydra_config=True)
    assert (slurm.hydra.launcher.partition, slurm.hydra.launcher.gpus_per_node) == ("a100", 4)
    assert joblib.hydra.launcher.n_jobs == 3


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_sigterm_stops_a_joblib_sweep_records_every_job_and_leaves_no_process(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    # three jobs on two workers; each job's latency timing would take hours, so the signal finds two running
    proc = subprocess.Popen([sys.executable, "-m", "qsfm_cli.app", "-m", "hydra/launcher=joblib_local",
                             "experiment=smoke", "progress=false", "eval.latency_repeats=1000000",
                             "prune.ratio=0.3,0.5,0.7", f"hydra.sweep.dir={sweep_dir}", f"cache.dir={tmp_path / 'cache'}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            records = [metrics_of(m.parent) for m in sweep_dir.glob("*/metrics.json")]
            if sum(r["status"] == "running" and r["settings"] is not None for r in records) == 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(1)
        time.sleep(3)                              # into the jobs' stages
        workers = descendants(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == (f"qsfm-run: interrupted by SIGTERM: 0 of 3 jobs finished, 3 recorded as "
                                            f"failed (qsfm-report {sweep_dir} lists them)")
    errors = sorted(metrics_of(m.parent)["error"] for m in sweep_dir.glob("*/metrics.json"))
    assert errors == ["KeyboardInterrupt: SIGTERM"] * 2 + ["KeyboardInterrupt: SIGTERM before the job started"]
    deadline = time.monotonic() + HANG_GUARD_S
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(1)
    assert not [p for p in workers if alive(p)]
