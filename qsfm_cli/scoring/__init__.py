"""Scorers: per prunable channel set, the order in which its channels should be removed.

A registry in the style of ``qsfm_cli.models``: each scorer is a frozen dataclass (its fields are its
options) in its own module of this package, registered with ``@register_scorer``; every module here is
imported below, so adding a scorer is one file plus one ``conf/scorer/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields

from .base import Scorer, StatRequest
from ..similarity import METRICS, similarity_matrix, similarity_sums

_REGISTRY: dict[str, type] = {}


def register_scorer(cls: type) -> type:
    """Register a scorer class under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_scorers() -> list[str]:
    return sorted(_REGISTRY)


def threshold_scorers() -> list[str]:
    """Scorers whose orders carry threshold values (what prune.threshold compares)."""
    return [name for name in list_scorers() if _REGISTRY[name].threshold_rule]


def get_scorer(name: str, **options) -> Scorer:
    """Build scorer ``name`` with ``options`` (each scorer's dataclass fields; defaults for the rest)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; accepted: {', '.join(list_scorers())}")
    cls = _REGISTRY[name]
    accepted = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for scorer {name!r}; accepted: "
                         f"{', '.join(accepted) or 'none'}")
    return cls(**options)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .qsfm import qsfm_order  # noqa: E402
from .simscore import simscore_order  # noqa: E402

__all__ = ["METRICS", "Scorer", "StatRequest", "get_scorer", "list_scorers", "qsfm_order", "register_scorer",
           "similarity_matrix", "similarity_sums", "simscore_order", "threshold_scorers"]
