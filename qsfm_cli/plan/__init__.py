"""Plan stage: from the scorers' removal orders and a pruning protocol to the channels each set keeps.

Protocols (config group ``prune/``; at most one of ``rates``, ``threshold``, ``target_macs_reduction``,
``target_speedup`` is set, else ``ratio`` applies), one registered strategy each:

- ``ratio=r`` (``ratio.py``): every set of the scope loses floor(r * C) of its C channels.
- ``rates="[0.]+[0.15]*2+[0.4]*27"`` (``rates.py``): the per-layer rate lists of HRank/CHIP, parsed by a
  small grammar (lists, ``+``, ``*``), mapped by a layout (``pruning.rate_layouts``, or one entry per
  set) chosen by the list's length, or by ``rate_layout`` where several layouts have that length; a set
  keeps int(C * (1 - rate)) channels, as the papers' code builds its pruned networks.
- ``threshold=tau`` (``threshold.py``): each set removes its leading channels whose ``Order.values``
  are >= tau.
- ``target_speedup=x`` (``speed.py``): per-set widths whose predicted latency on one runtime
  (``latency_runtime``, ``latency_batch``, ``latency_threads``; a ``latency_table``) is the unpruned
  latency over x, spread by ``allocation`` (``uniform`` or ``sensitivity``); the pruned network's real
  speed-up is then measured (``Strategy.verify``).
- ``target_macs_reduction=f`` (``target.py``): search the uniform ratio (``allocation=uniform``) or the
  global threshold (``allocation=threshold``) that removes the fraction f of the MACs, or
  (``allocation=sensitivity``, ``sensitivity.py``) measure every set's loss increase at a grid of
  ratios and choose per-set ratios reaching f with the least summed increase.

Every protocol's counts are then settled the same way (``base.settle``): a set keeps at least
``min_channels`` channels and, with ``round_to=N``, a multiple of N of them (rounded up, never more
than the set: a set that cannot keep fewer than its size under these rules is left whole).

The planner never edits weights and loads no data; it builds pruned copies only to count their MACs
(``counting.MacsMeter``) and, for the sensitivity table, to measure them with the loss it is given.
"""
from __future__ import annotations

from ..counting import MacsMeter
from ..registry import import_modules
from .base import PROTOCOLS, PlanContext, Strategy, keep_from_counts, make_keep, register_protocol, removed_count, \
    settle

import_modules(__name__, __path__)   # each protocol registers itself when its module is imported

from .rates import MAX_RATES, parse_rates  # noqa: E402
from .sensitivity import format_sensitivity, measure_sensitivity  # noqa: E402
from .spec import DEFAULT_GRID, PlanSpec  # noqa: E402
from .stage import plan_stage  # noqa: E402
from .target import ALLOCATIONS, TOLERANCE  # noqa: E402

__all__ = ["ALLOCATIONS", "DEFAULT_GRID", "MAX_RATES", "PROTOCOLS", "TOLERANCE", "MacsMeter", "PlanContext",
           "PlanSpec", "Strategy", "format_sensitivity", "keep_from_counts", "make_keep", "measure_sensitivity",
           "parse_rates", "plan_stage", "register_protocol", "removed_count", "settle"]
