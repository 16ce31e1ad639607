"""What every experiment logger shares: its interface, the fan-out over several, and flattening."""
from __future__ import annotations

import math
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

from ..files import atomic_write
from ..registry import Registry

STATUSES = ("ok", "failed", "interrupted")

LOGGERS: Registry[type["Logger"]] = Registry("logger", "logger")
register_logger = LOGGERS.register
list_loggers = LOGGERS.names


def get_logger(name: str, **options) -> "Logger":
    """Build logger ``name`` with ``options`` (its constructor's keyword arguments)."""
    return LOGGERS.build(name, options)


class Logger(ABC):
    """One tracking backend. A run is ``start`` -> ``log_metrics``* -> ``log_record`` -> ``log_artifact``*
    -> ``close``; as a context manager the run is closed with the status its block ended with.

    The public methods check their arguments, then call the backend's ``_start`` ... ``_close``.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self.run_name: str | None = None
        self.closed = False
        self._steps = 0

    def start(self, run_name: str, params: Mapping[str, Any]) -> None:
        """Open run ``run_name`` (in a sweep: the job's override dirname) with its parameters."""
        if not isinstance(run_name, str) or not run_name.strip():
            raise ValueError(f"logger run name must be a non-empty string; got {run_name!r}")
        if self.run_name is not None:
            raise RuntimeError(f"{self.name} logger already started run {self.run_name!r}; build one per run")
        try:
            self._start(run_name, flatten_params(params))
        except OSError as err:       # save_dir is a file, or a place this user cannot write
            where = getattr(self, "save_dir", None)
            raise ValueError(f"logger.{self.name}.save_dir={where}: cannot write {err.filename or where} "
                             f"({err.strerror or err}); accepted: a writable directory") from None
        self.run_name = run_name

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalars at ``step`` (None: one past the previous call's step); a None value (not measured at
        this step, like a test accuracy between evaluations) is left out."""
        self._require_started()
        step = self._steps if step is None else int(step)
        self._steps = step + 1
        self._log_metrics({str(k): float(v) for k, v in metrics.items() if v is not None}, step)

    def log_record(self, record: Mapping[str, Any]) -> None:
        """The run's final record (``metrics.json``): every numeric field, nested keys joined by ``/``."""
        self._require_started()
        self._log_record(flatten_numeric(record))

    def log_artifact(self, path: str | Path) -> None:
        self._require_started()
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"artifact {str(path)!r} is not a file")
        self._log_artifact(path)

    def close(self, status: str = "ok") -> None:
        """End the run with ``status``; closing again, or closing a run never started, does nothing."""
        if status not in STATUSES:
            raise ValueError(f"logger status {status!r}; accepted: {', '.join(STATUSES)}")
        if self.run_name is not None and not self.closed:
            self.closed = True
            self._close(status)

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status_of(exc_type))

    def _require_started(self) -> None:
        if self.run_name is None:
            raise RuntimeError(f"{self.name} logger: call start(run_name, params) first")
        if self.closed:
            raise RuntimeError(f"{self.name} logger: run {self.run_name!r} is closed")

    @abstractmethod
    def _start(self, run_name: str, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def _log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def _log_record(self, values: dict[str, float]) -> None: ...

    @abstractmethod
    def _log_artifact(self, path: Path) -> None: ...

    @abstractmethod
    def _close(self, status: str) -> None: ...


class Loggers(Logger):
    """Several loggers as one: every call goes to each, in order."""

    name = "loggers"

    def __init__(self, loggers: Iterable[Logger]):
        super().__init__()
        self.loggers = list(loggers)

    def _start(self, run_name: str, params: dict[str, Any]) -> None:
        """Start every logger; if one cannot, those already started are closed as failed."""
        for k, logger in enumerate(self.loggers):
            try:
                logger.start(run_name, params)
            except BaseException:
                for started in self.loggers[:k]:
                    started.close("failed")
                raise

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def _log_record(self, values: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_record(values)

    def _log_artifact(self, path: Path) -> None:
        for logger in self.loggers:
            logger.log_artifact(path)

    def _close(self, status: str) -> None:
        """Close every logger, even when one fails; the first failure is raised afterwards."""
        errors = []
        for logger in self.loggers:
            try:
                logger.close(status)
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]


def status_of(exc_type: type[BaseException] | None) -> str:
    """The run status that ending with ``exc_type`` means (None: no exception)."""
    if exc_type is None:
        return "ok"
    return "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"


def flatten_numeric(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a nested record by ``a/b/c`` key; booleans, strings, lists and nulls are left out."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_numeric(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                isinstance(value, float) and math.isnan(value)):
            flat[name] = float(value)
    return flat


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Parameters of a nested config by ``a.b.c`` key (as on Hydra's command line); scalars stay as they
    are, anything else (lists, None) becomes its text."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def safe_dirname(name: str) -> str:
    """``name`` usable as one directory level (a path separator in an override value would nest it)."""
    for sep in {os.sep, os.altsep} - {None}:
        name = name.replace(sep, "_")
    return name


def unique_dir(parent: Path, name: str) -> Path:
    """A new directory ``parent/name``, or ``name-1``, ``name-2``... when a run of that name exists."""
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(10_000):
        path = parent / (name if k == 0 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory for {name!r} under {parent}")


def copy_into(path: Path, folder: Path) -> Path:
    """Copy the file ``path`` into ``folder`` (atomically) and return the copy's path."""
    target = folder / path.name
    with open(path, "rb") as src:
        atomic_write(target, lambda f: shutil.copyfileobj(src, f))
    return target
