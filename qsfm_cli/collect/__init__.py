"""Collect stage: the streaming collector (``collector.py``: one pass over the images, every channel set at
once, O(sum C^2) memory) and the cached stage around it (``stage.py``). The statistics are plug-ins in the
style of ``qsfm_cli.scoring``: each is a class in its own module of this package, registered with
``@register_statistic``; every module here is imported below, so adding a statistic is one file.
"""
from __future__ import annotations

from ..registry import import_modules
from .base import STATISTICS, MeanStatistic, Statistic, StatRequest, get_statistic, list_statistics, register_statistic
from .collector import collect_stats

import_modules(__name__, __path__)

from .stage import CollectSpec, collect_stage, content_key  # noqa: E402

__all__ = ["STATISTICS", "CollectSpec", "MeanStatistic", "StatRequest", "Statistic", "collect_stage",
           "collect_stats", "content_key", "get_statistic", "list_statistics", "register_statistic"]
