"""``csv``: the run's logs as plain files in its own directory, readable with any CSV reader."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import write_csv, write_json
from .base import Logger, copy_into, register_logger


@register_logger
class CSVLogger(Logger):
    """Files under ``save_dir/name/``: ``metrics.csv`` (one row per ``log_metrics`` call, a ``step`` column
    first), ``record.csv`` (the final record's numbers, one row), ``run.json`` (run name, parameters,
    status, artifacts) and ``artifacts/``. An artifact already under ``save_dir`` (the run directory) is
    listed in ``run.json`` rather than copied."""

    name = "csv"

    def __init__(self, save_dir: str | Path = ".", name: str = "csv"):
        super().__init__()
        self.save_dir = Path(save_dir)
        self.dir = self.save_dir / name
        self._rows: list[dict[str, Any]] = []
        self._run: dict[str, Any] = {}

    def _start(self, run_name: str, params: dict[str, Any]) -> None:
        self._run = {"run_name": run_name, "status": "running", "params": params, "artifacts": []}
        write_json(self.dir / "run.json", self._run)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._rows.append({"step": step, **metrics})
        write_csv(self.dir / "metrics.csv", self._rows)

    def _log_record(self, values: dict[str, float]) -> None:
        write_csv(self.dir / "record.csv", [values])

    def _log_artifact(self, path: Path) -> None:
        source = path.resolve()
        if source.is_relative_to(self.save_dir.resolve()):
            listed = source
        else:
            listed = copy_into(path, self.dir / "artifacts").resolve()
        self._run["artifacts"].append(str(listed))
        write_json(self.dir / "run.json", self._run)

    def _close(self, status: str) -> None:
        self._run["status"] = status
        write_json(self.dir / "run.json", self._run)
