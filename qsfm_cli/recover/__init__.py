"""Recovery stage: repairing a pruned network without labels or fine-tuning.

A registry in the style of ``qsfm_cli.scoring``: each method is a frozen dataclass (its fields are its
options) in its own module of this package, registered with ``@register_recovery``; every module here is
imported below, so adding a method is one file plus one ``conf/recover/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass, fields

from .base import Recovery, RecoverySpec
from .bn import recalibrate_bn

_REGISTRY: dict[str, type[Recovery]] = {}


def register_recovery(cls: type[Recovery]) -> type[Recovery]:
    """Register a recovery class under its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        warnings.warn(f"recovery {cls.name!r} registered twice; the later definition wins", stacklevel=2)
    _REGISTRY[cls.name] = cls
    return cls


def list_recoveries() -> list[str]:
    return sorted(_REGISTRY)


def get_recovery(name: str = "none", *, bn_images: int = 0, bn_batch_size: int = 128, iterative_steps: int = 1,
                 **options) -> RecoverySpec:
    """The recovery ``name`` with its ``options`` (the method's dataclass fields; defaults for the rest)
    and the settings every method shares."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown recover.name {name!r}; accepted: {', '.join(list_recoveries())}")
    cls = _REGISTRY[name]
    accepted = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option recover.{unknown[0]} for recovery {name!r}; accepted: "
                         f"{', '.join(accepted) or 'none'} (and bn_images, bn_batch_size, iterative_steps)")
    return RecoverySpec(cls(**options), bn_images=bn_images, bn_batch_size=bn_batch_size,
                        iterative_steps=iterative_steps)


@register_recovery
@dataclass(frozen=True)
class NoRecovery(Recovery):
    """The pruned network as it comes out of pruning: the method's raw output."""

    name = "none"


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Recovery", "RecoverySpec", "get_recovery", "list_recoveries", "recalibrate_bn", "register_recovery"]
