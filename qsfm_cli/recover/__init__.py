"""Recovery stage: repairing a pruned network without labels or fine-tuning.

Each method is a frozen dataclass (its fields are its options) in its own module of this package,
registered with ``@register_recovery`` (``base.RECOVERIES``, a ``qsfm_cli.registry.Registry``); every module
here is imported below, so adding a method is one file plus one ``conf/recover/<name>.yaml``.
"""
from __future__ import annotations

from ..registry import import_modules
from .base import RECOVERIES, Recovery, RecoverySpec, get_recovery, list_recoveries, register_recovery
from .bn import recalibrate_bn

import_modules(__name__, __path__)

from .stage import cached_prune_and_recover, prune_and_recover  # noqa: E402

__all__ = ["RECOVERIES", "Recovery", "RecoverySpec", "cached_prune_and_recover", "get_recovery", "list_recoveries",
           "prune_and_recover", "recalibrate_bn", "register_recovery"]
