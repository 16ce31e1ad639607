"""What the papers state, in one place: their result rows, the sizes they give the unpruned networks, and
the conventions they count by (their per-layer rate layouts live with the pruning adapters they map onto).

Result rows (``REFERENCES``) are what reports mark beside this tool's own runs. Each keeps the figures
exactly as the paper states them, with where in the paper they are stated. A figure a paper does not state
is ``None``: reductions are derived from absolute MACs/params only against the paper's own baseline, never
filled in by guess.

Not included: the similarity-score paper (Cui et al., BDCC 2023), whose figures we could not check;
QSFM's fine-tuned CIFAR rows, whose settings we could not check (its ILSVRC-12 MobileNetV2 row is in, as the
abstract states it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .counting import count_macs

# The unpruned networks counted as the papers count them: conv/linear MACs (BatchNorm adds none) and
# conv/linear parameters only (HRank's and CHIP's params leave BatchNorm out; with it, ResNet-56 has
# 0.853018M). Reductions of rows that state only absolute figures are taken against these.
_RESNET56_BASE = {"macs_M": 125.485696, "params_M": 0.848954}
_RESNET110_BASE = {"macs_M": 252.88768, "params_M": 1.719866}

QSFM_SOURCE = "QSFM, Wang et al. 2021 (arXiv 2105.06052)"
HRANK_SOURCE = "HRank, Lin et al., CVPR 2020 (arXiv 2002.10179)"
CHIP_SOURCE = "CHIP, Sui et al., NeurIPS 2021 (arXiv 2110.13981)"


@dataclass(frozen=True)
class Reference:
    """One published pruning result.

    ``key`` names it in an experiment config (``reference: chip_resnet56_a``); ``method`` is the name of
    the matching scorer in this tool (``qsfm``, ``hrank``, ``chip``), so a report can pair the paper's
    point with the runs of the same criterion.
    """

    key: str
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


def _hrank56(key: str, top1: float, macs_M: float, params_M: float) -> Reference:
    return Reference(key, "hrank", "resnet56", "cifar10", HRANK_SOURCE, "ResNet-56 CIFAR-10 results table",
                     finetuned=True, base_top1=93.26, top1=top1, macs_M=macs_M, params_M=params_M,
                     base_macs_M=_RESNET56_BASE["macs_M"], base_params_M=_RESNET56_BASE["params_M"])


def _chip56(key: str, top1: float, macs_M: float, params_M: float) -> Reference:
    return Reference(key, "chip", "resnet56", "cifar10", CHIP_SOURCE, "CIFAR-10 results table", finetuned=True,
                     base_top1=93.26, top1=top1, macs_M=macs_M, params_M=params_M,
                     base_macs_M=_RESNET56_BASE["macs_M"], base_params_M=_RESNET56_BASE["params_M"])


REFERENCES: tuple[Reference, ...] = (
    Reference("qsfm_resnet56", "qsfm", "resnet56", "cifar10", QSFM_SOURCE, "ResNet-56 CIFAR-10 result",
              finetuned=False, stated_top1_drop=0.54,
              stated_macs_reduction_pct=48.27, stated_params_reduction_pct=57.90),
    # The abstract's edge-device figure: a 1.53x faster MobileNetV2 (measured on the device, no MACs stated);
    # an earlier version of the abstract says the MobileNetV2 results are with fine-tuning.
    Reference("qsfm_mobilenetv2_imagenet", "qsfm", "tv_mobilenet_v2", "imagenet", QSFM_SOURCE,
              "abstract: 1.53x inference speed-up on an edge device", finetuned=True, stated_top1_drop=1.23),
    _hrank56("hrank_resnet56_88m", top1=93.52, macs_M=88.72, params_M=0.71),
    _hrank56("hrank_resnet56", top1=93.17, macs_M=62.72, params_M=0.49),
    _hrank56("hrank_resnet56_33m", top1=90.72, macs_M=32.52, params_M=0.27),
    Reference("hrank_resnet110", "hrank", "resnet110", "cifar10", HRANK_SOURCE, "abstract", finetuned=True,
              base_top1=93.50, stated_top1_drop=0.14,
              stated_macs_reduction_pct=58.2, stated_params_reduction_pct=59.2),
    _chip56("chip_resnet56_a", top1=94.16, macs_M=65.94, params_M=0.48),
    _chip56("chip_resnet56_b", top1=92.05, macs_M=34.79, params_M=0.24),
    Reference("chip_resnet110", "chip", "resnet110", "cifar10", CHIP_SOURCE, "CIFAR-10 results table",
              finetuned=True, base_top1=93.50, top1=94.44, macs_M=140.54, params_M=1.04,
              base_macs_M=_RESNET110_BASE["macs_M"], base_params_M=_RESNET110_BASE["params_M"]),
)


def reference(key: str) -> Reference:
    """The published row named ``key`` (what an experiment config's ``reference:`` holds)."""
    for row in REFERENCES:
        if row.key == key:
            return row
    raise ValueError(f"reference={key}; accepted: {', '.join(r.key for r in REFERENCES)}")


def attached_reference(key: str | None, model: str, dataset: str, method: str) -> tuple[Reference | None, str]:
    """The published row ``key`` names, when it describes this run (same model, dataset and criterion),
    and "" ; else ``None`` and why it is not attached (a row is never shown beside another run's)."""
    if not key:
        return None, ""
    row = reference(key)
    ours = {"model": model, "dataset": dataset, "scorer": method}
    theirs = {"model": row.model, "dataset": row.dataset, "scorer": row.method}
    differ = [f"{k}={ours[k]} (the row's: {theirs[k]})" for k in ours if ours[k] != theirs[k]]
    if differ:
        return None, f"reference {key} not attached: {', '.join(differ)}"
    return row, ""


def references_for(model: str, dataset: str, method: str | None = None) -> list[Reference]:
    """Published rows for ``model`` on ``dataset`` (and criterion ``method`` when given)."""
    return [r for r in REFERENCES
            if r.model == model and r.dataset == dataset and (method is None or r.method == method)]


# ---------------------------------------------------------------------------- the papers' counting conventions

def conv_linear_params(model: nn.Module) -> int:
    """Parameters of conv and linear layers only: HRank's and CHIP's tables leave BatchNorm out."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(p.numel() for m in layers for p in m.parameters())


def thop_flops(model: nn.Module) -> int:
    """CHIP's FLOPs of a CIFAR ResNet, as ``thop`` counts them: conv/linear multiply-accumulates, plus
    2 operations per BatchNorm output element (eval mode), plus (kernel size + 1) per output of the
    final 8x8 global average pool."""
    bn: list[int] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: bn.append(out.numel())) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d)]
    try:
        macs = count_macs(model)
    finally:
        for handle in handles:
            handle.remove()
    return macs + 2 * sum(bn) + (8 * 8 + 1) * model.stage_widths[-1]


# ------------------------------------------------------------------------- the unpruned networks' sizes

@dataclass(frozen=True)
class PublishedSize:
    """An unpruned network's size as the literature states it: ``macs_M`` (None where not stated) and
    ``params_M``, counted with BatchNorm (``params_counting="all"``) or without it (``"conv_linear"``),
    both in millions and rounded as published (two decimals)."""

    model: str
    macs_M: float | None
    params_M: float
    params_counting: str
    source: str


PUBLISHED_SIZES: tuple[PublishedSize, ...] = (
    PublishedSize("resnet20", None, 0.27, "all", "He et al. 2016"),
    PublishedSize("resnet32", None, 0.46, "all", "He et al. 2016"),
    PublishedSize("resnet44", None, 0.66, "all", "He et al. 2016"),
    PublishedSize("resnet56", 125.49, 0.85, "all", f"He et al. 2016; {HRANK_SOURCE}"),
    PublishedSize("resnet110", 252.89, 1.73, "all", f"He et al. 2016; {HRANK_SOURCE}"),
    PublishedSize("vgg16_bn", 313.7, 14.98, "conv_linear", HRANK_SOURCE),
)


def published_size(model: str) -> PublishedSize | None:
    return next((row for row in PUBLISHED_SIZES if row.model == model), None)
