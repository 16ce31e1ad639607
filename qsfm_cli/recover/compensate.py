"""Recovering accuracy without fine-tuning: fold removed channels into their consumers, re-estimate BN.

A removed channel j whose map is (nearly) an affine function of kept maps, F_j ~ sum_k A[j, k] F_k + b_j,
can be removed with (almost) no change to its consumer: per pixel, the consumer computes
sum_c W[:, c] * F_c, so adding W[:, j] A[j, k] to W[:, k] reproduces the linear part exactly, and the
constant b_j contributes b_j * (sum over the kernel of W[o, j]) to output o, which goes into the consumer's
bias or, when it has none, is subtracted from the running mean of the BatchNorm that reads its output
(exact away from the zero-padded border). The fits come from the streaming moments (``LayerStats.values``
``"mean"`` and ``"gram"``): covariance = gram - mean mean^T.

- ``twin``: F_j ~ a F_i + b with i the twin the scorer paired j with (QSFM), folded in removal order so
  that a twin removed later carries what it received; a channel without a usable twin (a dead channel)
  is folded as its mean.
- ``lstsq``: all removed maps of a set regressed on all kept maps at once (ridge-regularized; with
  ridge 0 the minimum-norm least-squares fit, so that constant or collinear kept maps do no harm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..collect.base import StatRequest
from ..types import ChannelSet, Keep, LayerStats, Orders, SetStatus
from .base import Recovery, register_recovery

MODES = ("twin", "lstsq")


def compensate(model: nn.Module, channel_sets: list[ChannelSet], stats: dict[str, LayerStats], orders: Orders,
               keep: Keep, mode: str, ridge: float = 1e-3) -> dict[str, SetStatus]:
    """Edit, in place, the consumers of every set that loses channels under ``keep`` so that they
    approximate what they computed with all channels; call before ``apply_keep``.

    Returns, per such set, what was done ("compensated") or why not (for the log and ``metrics.json``).
    """
    if mode not in MODES:
        raise ValueError(f"recover.name={mode}; accepted: {', '.join(MODES)}")
    if ridge < 0:
        raise ValueError(f"recover.ridge={ridge}; accepted: >= 0 (0: plain least squares)")
    status = {}
    for s in channel_sets:
        kept = sorted(keep.get(s.name, range(s.size)))
        removed_set = set(range(s.size)) - set(kept)
        if not removed_set:
            continue
        reason = _skip_reason(model, s, stats.get(s.name), mode, orders.get(s.name))
        if reason:
            status[s.name] = SetStatus.skipped(reason)
            continue
        st = stats[s.name]
        mean = st.values["mean"].double().cpu()
        cov = st.values["gram"].double().cpu() - torch.outer(mean, mean)
        for consumer, norm in _consumers_and_norms(s):
            layer = model.get_submodule(consumer)
            weight = layer.weight.detach().double().cpu().clone()
            if mode == "twin":
                const = _fold_twins(weight, orders[s.name], removed_set, mean, cov)
            else:
                const = _fold_lstsq(weight, kept, sorted(removed_set), mean, cov, ridge)
            _write(model, layer, norm, weight, const)
        status[s.name] = SetStatus(True, "compensated")
    return status


def _consumers_and_norms(s: ChannelSet) -> list[tuple[str, str]]:
    """(consumer, the BatchNorm reading its output or "") pairs of a set."""
    return list(zip(s.consumers, s.consumer_norms or ("",) * len(s.consumers)))


def _skip_reason(model: nn.Module, s: ChannelSet, st: LayerStats | None, mode: str, order) -> str:
    if not s.consumers:
        return ("its map is not read by plain conv/linear layers only (residual stream, concatenation or "
                "depthwise conv), so no weight can absorb the removed channels")
    if st is None or not {"mean", "gram"} <= st.values.keys():
        return "no channel moments (mean, gram) were collected for it"
    if mode == "twin" and (order is None or order.twins is None):
        return "the scorer pairs no twins (only qsfm does); recover=lstsq works with any scorer"
    for consumer, norm in _consumers_and_norms(s):
        if model.get_submodule(consumer).bias is None and not norm:
            return f"consumer {consumer} has neither a bias nor a BatchNorm after it to take the constant"
    return ""


def _fold_twins(weight: torch.Tensor, order, removed: set[int], mean: torch.Tensor, cov: torch.Tensor
                ) -> torch.Tensor:
    """Fold removed channels into their twins in removal order; returns the per-output constant."""
    const = torch.zeros(weight.shape[0], dtype=torch.float64)
    gone: set[int] = set()
    for j, i in zip(order.removal, order.twins):
        if j not in removed:
            continue
        usable = 0 <= i != j and i not in gone and cov[i, i] > 1e-12 * max(float(cov.diagonal().max()), 1e-30)
        a = float(cov[i, j] / cov[i, i]) if usable else 0.0
        b = float(mean[j] - a * mean[i]) if usable else float(mean[j])
        if usable:
            weight[:, i] += a * weight[:, j]
        const += b * weight[:, j].reshape(weight.shape[0], -1).sum(1)
        gone.add(j)
    return const


def _fold_lstsq(weight: torch.Tensor, kept: list[int], removed: list[int], mean: torch.Tensor,
                cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """Regress removed maps on kept ones, F_D ~ A F_K + b, and fold A into the kept columns."""
    k, d = torch.as_tensor(kept), torch.as_tensor(removed)
    cov_kk = cov[k][:, k]
    if ridge > 0:
        # The ridge is relative to the kept maps' mean variance, so it means the same at any activation scale.
        lam = ridge * float(cov_kk.diagonal().mean().clamp_min(1e-30))
        a = torch.linalg.solve(cov_kk + lam * torch.eye(len(kept), dtype=cov.dtype), cov[k][:, d]).T  # [D, K]
    else:
        # Minimum-norm least squares: cov_kk is singular as soon as a kept map is constant (dead) or a
        # combination of others. Directions with a variance under 1e-10 of the largest are cut: below that,
        # cov = gram - mean mean^T is rounding error, and fitting it would give huge, meaningless weights.
        a = (torch.linalg.pinv(cov_kk, rtol=1e-10, hermitian=True) @ cov[k][:, d]).T
    b = mean[d] - a @ mean[k]
    w_d = weight[:, d]
    weight[:, k] += torch.einsum("od...,dk->ok...", w_d, a)
    return torch.einsum("od,d->o", w_d.reshape(*w_d.shape[:2], -1).sum(-1), b)


@torch.no_grad()
def _write(model: nn.Module, layer: nn.Module, norm: str, weight: torch.Tensor, const: torch.Tensor) -> None:
    layer.weight.copy_(weight.to(layer.weight))
    if layer.bias is not None:
        layer.bias.add_(const.to(layer.bias))
    else:
        bn = model.get_submodule(norm)
        bn.running_mean.sub_(const.to(bn.running_mean))


@dataclass(frozen=True)
class _Compensation(Recovery):
    """A fold from the collected channel moments (see the module docstring)."""

    ridge: float = 1e-3

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError(f"recover.ridge={self.ridge}; accepted: >= 0 (0: plain least squares)")

    def requests(self) -> set[StatRequest]:
        return {StatRequest.moments()}

    def fold(self, model: nn.Module, sets: list[ChannelSet], stats: dict[str, LayerStats], orders: Orders,
             keep: Keep) -> dict[str, SetStatus]:
        return compensate(model, sets, stats, orders, keep, self.name, ridge=self.ridge)


@register_recovery
@dataclass(frozen=True)
class Twin(_Compensation):
    """QSFM's own repair: each removed channel folded into its most similar kept twin."""

    name = "twin"


@register_recovery
@dataclass(frozen=True)
class LeastSquares(_Compensation):
    """All removed maps of a set regressed on its kept maps, folded into the consumers."""

    name = "lstsq"
