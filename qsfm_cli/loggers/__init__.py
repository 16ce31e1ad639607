"""Experiment loggers: where a run's parameters, per-epoch metrics, final record and files are tracked.

Each logger is a class in its own module of this package, registered with ``@register_logger``
(``base.LOGGERS``, a ``qsfm_cli.registry.Registry``); every module here is imported below. ``Loggers``
sends every call to several. The backends' packages (tensorboard, mlflow: ``pip install qsfm-cli[track]``)
are imported when a logger of theirs is built, so the package itself needs neither.
"""
from __future__ import annotations

from ..registry import import_modules
from .base import (LOGGERS, STATUSES, Logger, Loggers, flatten_numeric, flatten_params, get_logger, list_loggers,
                   register_logger)

import_modules(__name__, __path__)

from .csv_logger import CSVLogger  # noqa: E402
from .mlflow_logger import MLflowLogger  # noqa: E402
from .tensorboard_logger import TensorBoardLogger  # noqa: E402

__all__ = ["CSVLogger", "LOGGERS", "Logger", "Loggers", "MLflowLogger", "STATUSES", "TensorBoardLogger",
           "flatten_numeric", "flatten_params", "get_logger", "list_loggers", "register_logger"]
