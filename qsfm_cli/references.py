"""Published results that reports mark beside this tool's own runs.

Each row keeps the figures exactly as the paper states them, with where in the paper they are stated.
A figure a paper does not state is ``None``: reductions are derived from absolute MACs/params only
against the paper's own baseline, never filled in by guess.

Not included: the similarity-score paper (Cui et al., BDCC 2023), whose figures we could not check;
QSFM's fine-tuned rows, whose settings we could not check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ResNet-56's own size (the papers' baseline rows round it to 125.49M MACs / 0.85M params); reductions of
# rows that state only absolute figures are taken against it.
_RESNET56_BASE = {"macs_M": 125.485696, "params_M": 0.853018}

QSFM_SOURCE = "QSFM, Wang et al. 2021 (arXiv 2105.06052)"
HRANK_SOURCE = "HRank, Lin et al., CVPR 2020 (arXiv 2002.10179)"
CHIP_SOURCE = "CHIP, Sui et al., NeurIPS 2021 (arXiv 2110.13981)"


@dataclass(frozen=True)
class Reference:
    """One published pruning result.

    ``method`` is the name of the matching scorer in this tool (``qsfm``, ``hrank``, ``chip``), so a
    report can pair the paper's point with the runs of the same criterion.
    """

    method: str
    model: str
    dataset: str
    source: str
    where: str
    finetuned: bool
    base_top1: float | None = None
    top1: float | None = None
    stated_top1_drop: float | None = None
    macs_M: float | None = None
    params_M: float | None = None
    base_macs_M: float | None = None
    base_params_M: float | None = None
    stated_macs_reduction_pct: float | None = None
    stated_params_reduction_pct: float | None = None

    @property
    def top1_drop(self) -> float | None:
        if self.stated_top1_drop is not None:
            return self.stated_top1_drop
        if self.top1 is None or self.base_top1 is None:
            return None
        return round(self.base_top1 - self.top1, 2)

    @property
    def macs_reduction_pct(self) -> float | None:
        return _reduction(self.stated_macs_reduction_pct, self.macs_M, self.base_macs_M)

    @property
    def params_reduction_pct(self) -> float | None:
        return _reduction(self.stated_params_reduction_pct, self.params_M, self.base_params_M)

    @property
    def label(self) -> str:
        return f"{self.source} ({'fine-tuned' if self.finetuned else 'no fine-tuning'})"

    def as_dict(self) -> dict[str, Any]:
        """The ``reference`` block of a run's ``metrics.json``."""
        return {
            "source": f"{self.source}, {self.where}",
            "method": self.method,
            "finetuned": self.finetuned,
            "macs_reduction_pct": self.macs_reduction_pct,
            "params_reduction_pct": self.params_reduction_pct,
            "top1_drop": self.top1_drop,
            "macs_M": self.macs_M,
            "params_M": self.params_M,
            "top1": self.top1,
            "base_top1": self.base_top1,
        }


def _reduction(stated: float | None, value: float | None, base: float | None) -> float | None:
    if stated is not None:
        return stated
    if value is None or base is None:
        return None
    return round(100.0 * (1.0 - value / base), 2)


def _hrank56(top1: float, macs_M: float, params_M: float) -> Reference:
    return Reference("hrank", "resnet56", "cifar10", HRANK_SOURCE, "ResNet-56 CIFAR-10 results table",
                     finetuned=True, base_top1=93.26, top1=top1, macs_M=macs_M, params_M=params_M,
                     base_macs_M=_RESNET56_BASE["macs_M"], base_params_M=_RESNET56_BASE["params_M"])


def _chip56(top1: float, macs_M: float, params_M: float) -> Reference:
    return Reference("chip", "resnet56", "cifar10", CHIP_SOURCE, "CIFAR-10 results table", finetuned=True,
                     base_top1=93.26, top1=top1, macs_M=macs_M, params_M=params_M,
                     base_macs_M=_RESNET56_BASE["macs_M"], base_params_M=_RESNET56_BASE["params_M"])


REFERENCES: tuple[Reference, ...] = (
    Reference("qsfm", "resnet56", "cifar10", QSFM_SOURCE, "ResNet-56 CIFAR-10 result",
              finetuned=False, stated_top1_drop=0.54,
              stated_macs_reduction_pct=48.27, stated_params_reduction_pct=57.90),
    _hrank56(top1=93.52, macs_M=88.72, params_M=0.71),
    _hrank56(top1=93.17, macs_M=62.72, params_M=0.49),
    _hrank56(top1=90.72, macs_M=32.52, params_M=0.27),
    Reference("hrank", "resnet110", "cifar10", HRANK_SOURCE, "abstract", finetuned=True,
              base_top1=93.50, stated_top1_drop=0.14,
              stated_macs_reduction_pct=58.2, stated_params_reduction_pct=59.2),
    _chip56(top1=94.16, macs_M=65.94, params_M=0.48),
    _chip56(top1=92.05, macs_M=34.79, params_M=0.24),
    Reference("chip", "resnet110", "cifar10", CHIP_SOURCE, "abstract", finetuned=True,
              base_top1=93.50, top1=94.44, stated_macs_reduction_pct=52.1, stated_params_reduction_pct=48.3),
)


def references_for(model: str, dataset: str, method: str | None = None) -> list[Reference]:
    """Published rows for ``model`` on ``dataset`` (and criterion ``method`` when given)."""
    return [r for r in REFERENCES
            if r.model == model and r.dataset == dataset and (method is None or r.method == method)]
