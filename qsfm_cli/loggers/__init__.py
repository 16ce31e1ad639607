"""Experiment loggers: where a run's parameters, per-epoch metrics, final record and files are tracked.

A registry in the style of ``qsfm_cli.scoring``: each logger is a class in its own module of this package,
registered with ``@register_logger``; every module here is imported below. ``Loggers`` sends every call to
several. The backends' packages (tensorboard, mlflow: ``pip install qsfm-cli[track]``) are imported when a
logger of theirs is built, so the package itself needs neither.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from .base import STATUSES, Logger, Loggers, flatten_numeric, flatten_params

_REGISTRY: dict[str, type[Logger]] = {}


def register_logger(cls: type[Logger]) -> type[Logger]:
    """Register a logger class under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_loggers() -> list[str]:
    return sorted(_REGISTRY)


def get_logger(name: str, **options) -> Logger:
    """Build logger ``name`` with ``options`` (its constructor's keyword arguments)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown logger {name!r}; accepted: {', '.join(list_loggers())}")
    cls = _REGISTRY[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for logger {name!r}; accepted: {', '.join(accepted)}")
    return cls(**options)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .csv_logger import CSVLogger  # noqa: E402
from .mlflow_logger import MLflowLogger  # noqa: E402
from .tensorboard_logger import TensorBoardLogger  # noqa: E402

__all__ = ["CSVLogger", "Logger", "Loggers", "MLflowLogger", "STATUSES", "TensorBoardLogger", "flatten_numeric",
           "flatten_params", "get_logger", "list_loggers", "register_logger"]
