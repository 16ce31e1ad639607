"""Scorers: per prunable channel set, the order in which its channels should be removed.

Each scorer is a frozen dataclass (its fields are its options) in its own module of this package,
registered with ``@register_scorer`` (``base.SCORERS``, a ``qsfm_cli.registry.Registry``); every module
here is imported below, so adding a scorer is one file plus one ``conf/scorer/<name>.yaml``.
"""
from __future__ import annotations

from ..registry import import_modules
from ..similarity import METRICS, similarity_matrix, similarity_sums
from .base import SCORERS, Scorer, StatRequest, get_scorer, list_scorers, register_scorer, threshold_scorers

import_modules(__name__, __path__)

from .qsfm import qsfm_order  # noqa: E402
from .simscore import simscore_order  # noqa: E402
from .stage import score_stage  # noqa: E402

__all__ = ["METRICS", "SCORERS", "Scorer", "StatRequest", "get_scorer", "list_scorers", "qsfm_order",
           "register_scorer", "score_stage", "similarity_matrix", "similarity_sums", "simscore_order",
           "threshold_scorers"]
