"""``mlflow``: one MLflow run per job in one experiment, on a local store or any tracking server."""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from .base import Logger, register_logger

MLFLOW_STATUS = {"ok": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
# How long a tracking server that nobody answers holds the run (MLflow's own defaults retry for minutes):
# two retries, 1 s and 2 s apart, each request waiting at most 10 s. A variable the user set is left as it is.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BATCH = 100          # MLflow's limit on parameters per log_batch call


def metric_key(key: str) -> str:
    """MLflow accepts letters, digits, ``_ - . /`` and spaces in names: ``MACs_reduction_%`` would fail."""
    return re.sub(r"[^\w\-. /]", "_", key)


@register_logger
class MLflowLogger(Logger):
    """Runs named by the caller (in a sweep, the job's override dirname) in experiment ``experiment_name``.

    ``tracking_uri=None`` keeps everything under ``save_dir``: an SQLite store ``mlflow.db`` and the
    artifacts in ``artifacts/`` (MLflow 3 refuses a bare directory store); any other URI (``sqlite:///...``,
    ``http://host:5000``) is used as given, artifacts where its server puts them.
    """

    name = "mlflow"

    def __init__(self, experiment_name: str = "qsfm", tracking_uri: str | None = None,
                 save_dir: str | Path = "outputs/mlruns"):
        super().__init__()
        from mlflow.tracking import MlflowClient  # noqa: F401  (fails here, not mid-run, if missing)

        if not isinstance(experiment_name, str) or not experiment_name.strip():
            raise ValueError(f"mlflow experiment_name must be a non-empty string; got {experiment_name!r}")
        self.experiment_name = experiment_name
        self.save_dir = Path(save_dir).resolve()
        self.local = tracking_uri is None
        self.tracking_uri = f"sqlite:///{self.save_dir / 'mlflow.db'}" if self.local else tracking_uri
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is None:
            artifacts = (self.save_dir / "artifacts").as_uri() if self.local else None
            try:
                return self.client.create_experiment(self.experiment_name, artifact_location=artifacts)
            except MlflowException:       # another job of the sweep created it first
                found = self.client.get_experiment_by_name(self.experiment_name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise ValueError(f"mlflow experiment {self.experiment_name!r} is deleted; restore it or choose "
                             "another experiment_name")
        return found.experiment_id

    def _server_experiment_id(self) -> str:
        """``_experiment_id`` from a tracking server; one line within seconds (``HTTP_DEFAULTS``) when nobody
        answers."""
        from mlflow.exceptions import MlflowException

        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        retries = logging.getLogger("urllib3.connectionpool")   # a console warning per retry, else
        level = retries.level
        retries.setLevel(logging.ERROR)
        try:
            return self._experiment_id()
        except MlflowException as err:
            text = str(err).strip()
            reason = next((r for r in ("connection refused", "timed out", "name or service not known")
                           if r in text.lower()), text.splitlines()[0][:200] if text else type(err).__name__)
            raise ValueError(f"logger.mlflow.tracking_uri={self.tracking_uri}: the tracking server does not "
                             f"answer ({reason}); start it, or run without logger=mlflow") from None
        finally:
            retries.setLevel(level)

    def _start(self, run_name: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        if self.local:
            # Parallel jobs of a sweep would otherwise race to create the store's tables and the experiment.
            self.save_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.save_dir / ".lock")):
                self.client = MlflowClient(tracking_uri=self.tracking_uri)
                experiment_id = self._experiment_id()
        else:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            experiment_id = self._server_experiment_id()
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        entries = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(entries), BATCH):
            self.client.log_batch(self.run_id, params=entries[i:i + BATCH])

    def _log_values(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(metric_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(entries), BATCH):
            self.client.log_batch(self.run_id, metrics=entries[i:i + BATCH])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._log_values(metrics, step)

    def _log_record(self, values: dict[str, float]) -> None:
        self._log_values(values, 0)

    def _log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def _close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])
