"""``qsfm-run``: the Hydra edge. Composes the config, turns it into an ``Experiment`` and runs it.

Every failure ends in one line on stderr. A config that Hydra refuses (a wrong type, an unknown or renamed
key) and a bad value are refused before any work, with exit code 2; any other error exits with 1 (the
traceback is in the run's log). A run's ``metrics.json`` says ``running`` from its start, then ``ok`` or
``failed`` with the error. In a multirun the sweep goes on past a failed job, and ends with one line
counting the failures and exit code 1.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import config, distributed, outputs, papers
from .collect import CollectSpec
from .data import identity
from .distributed import resolve_device
from .evaluate import EvalSpec
from .export import ExportSpec
from .loggers import Loggers
from .models import default_normalization
from .pipeline import Experiment, check_seed, run_experiment
from .plan import PlanSpec
from .record import FAILED, OK, RunRecord, error_text
from .train import Execution, TrainRecipe

log = logging.getLogger("qsfm_cli")
T = TypeVar("T")
PACKAGE_DIR = Path(__file__).resolve().parent

config.register()


def config_dir() -> Path:
    """The shipped configs: inside the package in a wheel install, the repo's ``conf/`` in a checkout."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"qsfm_cli configs not found beside {PACKAGE_DIR}; reinstall the package")


def build(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate``, re-raising the target's own error (Hydra wraps it in several lines)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise (err.__cause__ or err) from None


def job_slot() -> int:
    """The job's number within its sweep (0 for a single run, or outside a Hydra job): which GPU
    ``device=auto`` gives it."""
    if not HydraConfig.initialized():
        return 0
    hydra = HydraConfig.get()
    return hydra.job.num if hydra.mode == RunMode.MULTIRUN else 0


def plain(node: DictConfig) -> Any:
    return OmegaConf.to_container(node, resolve=True)


def build_loggers(cfg: DictConfig, run_dir: Path) -> Loggers | None:
    """The ``logger`` group's loggers as one (``None`` when it names none); built on rank 0 only, the
    one that tracks the run. A logger whose ``save_dir`` is null writes into the run directory."""
    nodes = cfg.get("logger") or {}
    if not nodes or not distributed.current().is_main:
        return None
    return Loggers([build(node, **({"save_dir": str(run_dir)} if node.get("save_dir", "") is None else {}))
                    for node in nodes.values()])


def run_name(run_dir: Path) -> str:
    """The logger's name of the job: Hydra's override dirname (in a sweep, what varied), else the run
    directory's name."""
    return (HydraConfig.initialized() and HydraConfig.get().job.override_dirname) or run_dir.name


def build_experiment(cfg: DictConfig, run_dir: Path) -> Experiment:
    """Translate a composed config into an ``Experiment``: every spec first (each checks its values), the
    data last, so that a bad value is refused before any work."""
    check_seed(cfg.seed)
    prune = plain(cfg.prune)
    if isinstance(prune["rates"], (int, float)):   # prune.rates=0.5: one rate
        prune["rates"] = str(prune["rates"])
    specs = dict(
        plan=PlanSpec.from_config(prune),
        recovery=build(cfg.recover),
        finetune=within("finetune", TrainRecipe.from_dict, plain(cfg.finetune)),
        baseline_recipe=within("baseline.recipe", TrainRecipe.from_dict, plain(cfg.baseline.recipe))
        if cfg.baseline.train else None,
        execution=within("execution", Execution.from_dict, plain(cfg.execution)),
        collect=CollectSpec(**plain(cfg.collect)),
        eval=EvalSpec(**plain(cfg.eval)),
        export=ExportSpec(**plain(cfg.export)),
        scorer=build(cfg.scorer),
        reference=reference_of(cfg),
        device=str(resolve_device(cfg.device, job_slot())),
    )
    mean, std = cfg.model.mean, cfg.model.std
    check_normalization(mean, std)
    data = build(cfg.dataset)
    train_set, test_set = data.load()
    if mean is None and std is None:  # the recipe on the weights' card, if they were trained on this dataset
        mean, std = default_normalization(cfg.model.name, cfg.dataset.name) or (None, None)
    return Experiment(
        model_name=cfg.model.name,
        model_kwargs=plain(cfg.model.kwargs),
        train_set=train_set.with_normalization(mean, std),
        test_set=test_set.with_normalization(mean, std),
        run_dir=run_dir,
        checkpoint=cfg.model.checkpoint,
        pretrained=cfg.model.pretrained,
        allow_pickle=cfg.model.allow_pickle,
        seed=cfg.seed,
        cache_dir=Path(cfg.cache.dir) if cfg.cache.enabled else None,
        resume=cfg.resume,
        save_model=cfg.save_model,
        progress=cfg.progress,
        dataset_options=identity(data),
        config=container(cfg),
        logger=build_loggers(cfg, run_dir),
        run_name=run_name(run_dir),
        **specs,
    )


def reference_of(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``reference:`` row of the config, only where it describes this run (model, dataset, scorer)."""
    row, why = papers.attached_reference(cfg.reference, cfg.model.name, cfg.dataset.name, cfg.scorer.name)
    if why:
        log.warning("%s", why)
    return row.as_dict() if row else None


def check_normalization(mean: Any, std: Any) -> None:
    """``model.mean`` and ``model.std``: three values each (std > 0), or null."""
    for key, values in (("model.mean", mean), ("model.std", std)):
        if values is not None and (len(values) != 3 or (key == "model.std" and min(values) <= 0)):
            raise ValueError(f"{key}={list(values)}; accepted: three values{' > 0' if key == 'model.std' else ''}, "
                             f"or null (the weights' card, else the dataset's own)")


def within(section: str, make: Callable[[Any], T], values: Any) -> T:
    """``make(values)``, its bad-value error (``key=value; accepted: ...``) naming the key under the config
    section it came from."""
    try:
        return make(values)
    except ValueError as err:
        raise ValueError(f"{section}.{err}") from None


def print_summary(record: RunRecord) -> None:
    row = outputs.results_row(record)
    width = max(map(len, row))
    print("\n".join(f"{key:<{width}}  {value}" for key, value in row.items()))


def run(cfg: DictConfig) -> RunRecord:
    """Run one job. A run directory holding a finished run is refused first; any later failure is
    recorded in its ``metrics.json`` and re-raised."""
    distributed.init()          # a submitit task of a multi-GPU SLURM job starts here, not in main()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    outputs.refuse_finished(run_dir)
    record = RunRecord(None, config=container(cfg))
    is_main = distributed.current().is_main
    if is_main:       # running from the first moment: loading the data may be what fails or hangs
        outputs.write_record(run_dir, record)
    try:
        exp = build_experiment(cfg, run_dir)
    except BaseException as err:
        if is_main:
            record.status, record.error = FAILED, error_text(err)
            outputs.write_record(run_dir, record)
        raise
    return run_experiment(exp)


def container(cfg: DictConfig) -> dict:
    """The config as plain data, resolved where it resolves (a bad interpolation may be the failure)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


class SweepStop:
    """SIGTERM to a sweep that runs on this machine (Hydra's basic or joblib launcher). The job running in
    each process is interrupted and recorded as failed (``KeyboardInterrupt: SIGTERM``); every job not yet
    started is recorded the same way without running; the sweep's process passes the signal on to joblib's
    loky workers, has loky shut them down once the sweep has ended, and says how many jobs finished."""

    signum: int | None = None
    runs_jobs = False        # this process runs jobs (a loky worker, or the basic launcher's process)
    in_job = False

    @classmethod
    def install(cls) -> None:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is not cls._handle:
            signal.signal(signal.SIGTERM, cls._handle)

    @classmethod
    def _handle(cls, signum: int, frame: Any) -> None:
        first = cls.signum is None
        cls.signum = signum
        if cls.in_job:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        if cls.runs_jobs:    # between two jobs: the next ones are recorded without running
            return
        workers = multiprocessing.active_children()   # in the sweep's process: loky's workers running the jobs
        if not workers:      # a launcher whose jobs run elsewhere: the signal does what it did before
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        for child in workers if first else []:
            os.kill(child.pid, signum)

    @staticmethod
    def applies() -> bool:
        """On a launcher that runs the jobs on this machine (a cluster's scheduler has its own signals)."""
        target = str(HydraConfig.get().launcher.get("_target_", ""))
        return "BasicLauncher" in target or "JoblibLauncher" in target

    @classmethod
    def end_of_sweep(cls, finished: int, jobs: int, sweep: Path) -> None:
        """After an interrupted sweep: loky's workers shut down, one line, exit code 128 + the signal."""
        if multiprocessing.active_children():
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor(reuse=True).shutdown(wait=True)   # idle by now: they exit cleanly
        name = signal.Signals(cls.signum).name
        print(f"qsfm-run: interrupted by {name}: {finished} of {jobs} jobs finished, {jobs - finished} recorded as "
              f"failed (qsfm-report {sweep} lists them)", file=sys.stderr)
        sys.exit(128 + cls.signum)


def run_job(cfg: DictConfig) -> RunRecord | None:
    """``run`` as one job of a sweep on this machine: stoppable by SIGTERM (``SweepStop``); a job that a
    signal reaches before it starts is recorded as failed without running (returns None)."""
    SweepStop.install()
    SweepStop.runs_jobs = SweepStop.in_job = True
    try:
        if SweepStop.signum is not None:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            if distributed.current().is_main and outputs.read_status(run_dir) != OK:
                outputs.write_record(run_dir, RunRecord(None, status=FAILED, config=container(cfg), error=(
                    f"KeyboardInterrupt: {signal.Signals(SweepStop.signum).name} before the job started")))
            return None
        return run(cfg)
    except KeyboardInterrupt:
        SweepStop.signum = SweepStop.signum or signal.SIGINT   # training's own handler took the signal
        raise
    finally:
        SweepStop.in_job = False


class FailedJobs(Callback):
    """Ends a multirun in which a job failed with one line and exit code 1, once every job has run.

    The jobs of this multirun are the job dirs whose ``.hydra`` record was written since it started; a
    job failed unless it wrote a ``metrics.json`` with status ok since then (a refused job writes none).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep, subdir = Path(config.hydra.sweep.dir), config.hydra.output_subdir
        if subdir is None:
            return
        jobs = sorted(p.parent.parent for p in sweep.rglob(f"{subdir}/overrides.yaml")
                      if p.stat().st_mtime >= self.started)
        failed = [job for job in jobs if not self._finished(job / outputs.METRICS_FILE)]
        if SweepStop.signum is not None:
            SweepStop.end_of_sweep(len(jobs) - len(failed), len(jobs), sweep)
        if failed:
            first = failed[0].relative_to(sweep) / outputs.METRICS_FILE
            print(f"qsfm-run: error: {len(failed)} of {len(jobs)} jobs failed (see {sweep}/{first}; "
                  f"qsfm-report {sweep} lists them all)", file=sys.stderr)
            sys.exit(1)

    def _finished(self, metrics: Path) -> bool:
        return metrics.is_file() and metrics.stat().st_mtime >= self.started \
            and outputs.read_status(metrics.parent) == OK


def log_to_files(level: int, message: str, exc_info: Any = None) -> None:
    """``message`` (and a traceback) into the run's log file only: on the console, the one
    ``qsfm-run: error:`` line says it."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """One job. In a multirun a failure is logged and recorded, and the sweep goes on; a single run ends
    with one line on stderr: exit code 2 for a bad value, 1 for any other error (traceback in the log)."""
    single = HydraConfig.get().mode != RunMode.MULTIRUN
    try:
        record = run(cfg) if single or not SweepStop.applies() else run_job(cfg)
        if record is None:
            return
    except (ValueError, FileNotFoundError) as err:
        if single:
            log_to_files(logging.ERROR, str(err))
            print(f"qsfm-run: error: {first_line(err)}", file=sys.stderr)
            sys.exit(2)
        log.error("%s", err)
        return
    except KeyboardInterrupt as err:
        if not single:
            log.warning("job interrupted: %s", first_line(err))
            return
        print(f"qsfm-run: interrupted: {err}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if not single:
            log.exception("job failed")
            return
        log_to_files(logging.ERROR, "job failed", sys.exc_info())
        log_file = Path(HydraConfig.get().runtime.output_dir) / f"{HydraConfig.get().job.name}.log"
        print(f"qsfm-run: error: {error_text(err)} (traceback in {log_file})", file=sys.stderr)
        sys.exit(1)
    print_summary(record)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unquoted_space(word: str, argv: list[str]) -> str:
    """An override without ``=``: most often the rest of a value that holds a space the shell split off."""
    before = argv[argv.index(word) - 1] if word in argv[1:] else None
    if before is not None and "=" in before:
        return (f"override {word!r} is not key=value: a value holding a space must be quoted, as in "
                f"'{before} {word}'")
    return f"override {word!r} is not key=value (key=value, and a value holding a space quoted: 'key=a b')"


def config_error(err: BaseException) -> str:
    """Hydra's or OmegaConf's error in one line: ``key: message``, or where a key was renamed, its new
    name."""
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    key = getattr(cause, "full_key", None)
    if key:
        message = str(getattr(cause, "msg", cause)).strip().splitlines()[0]
        return config.moved(key) or f"{key}: {message.replace(' of type ' + repr('str'), '')}"
    text = str(err).split("Config search path")[0]
    unpaired = re.match(r"Error parsing override '(.*)'\s+missing EQUAL", text)
    if unpaired:
        return unquoted_space(unpaired.group(1), sys.argv[1:])
    head, _, options = text.partition("Available options in")
    if options:
        group, *choices = [line.strip() for line in options.splitlines() if line.strip()]
        return f"{' '.join(head.split())}; available options in {group} {', '.join(choices)}"
    failed = next((e for e in (err, err.__cause__) if isinstance(e, OSError) and e.filename), None)
    if failed is not None:
        return f"cannot write {failed.filename}: {failed.strerror}"
    return " ".join(text.split()) or type(err).__name__


def main() -> None:
    """``qsfm-run``. Hydra's own errors (composition, run directory, launcher) come back as one line and
    exit code 2; ``HYDRA_FULL_ERROR=1`` shows them in full."""
    full = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra raises, instead of printing over several lines, what it would report itself.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    distributed.init()          # under torchrun: every rank joins before Hydra makes the run directory
    sys.argv += distributed.hydra_overrides()
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        SweepStop.install()
    try:
        _hydra_main()
    except Exception as err:
        if full == "1":
            raise
        print(f"qsfm-run: error: {config_error(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if full is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full


if __name__ == "__main__":
    # Run as the importable module, so that a launcher's worker processes find the job function by name.
    from qsfm_cli.app import main as importable_main

    importable_main()
