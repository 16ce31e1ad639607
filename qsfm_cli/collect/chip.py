"""CHIP's statistic: the mean channel independence of each channel,
CI_c = ||A||_* - ||A with row c zeroed||_* for the C x HW matrix A of one image's maps."""
from __future__ import annotations

import torch

from .base import MeanStatistic, register_statistic

# (image, channel) cases per batched SVD: at most this many matrix elements at once
_SVD_CHUNK_ELEMENTS = 1 << 22


def channel_independence(maps: torch.Tensor) -> torch.Tensor:
    """[N, C] float64: CI of every channel on every image of ``maps`` [N, C, H, W].

    With A^T = QR (Q with orthonormal columns), A = R^T Q^T, and zeroing row c of A zeroes row c of R^T:
    so the C + 1 nuclear norms of one image come from small C x min(C, HW) matrices, after one QR of the
    image's maps, without squaring A (a Gram matrix would lose half the digits of small singular values).
    """
    n, c = maps.shape[:2]
    factor = torch.linalg.qr(maps.reshape(n, c, -1).transpose(1, 2).double(), mode="r").R.transpose(1, 2)
    full = torch.linalg.svdvals(factor).sum(-1)                                      # [N]
    keep = 1 - torch.eye(c, dtype=factor.dtype, device=factor.device).unsqueeze(2)    # [C, C, 1]: row c zeroed
    cases = torch.cartesian_prod(torch.arange(n, device=factor.device), torch.arange(c, device=factor.device))
    without = torch.empty(n * c, dtype=factor.dtype, device=factor.device)
    step = max(1, _SVD_CHUNK_ELEMENTS // factor[0].numel())
    for start in range(0, n * c, step):
        image, channel = cases[start:start + step].unbind(1)
        without[start:start + step] = torch.linalg.svdvals(factor[image] * keep[channel]).sum(-1)
    return full.unsqueeze(1) - without.view(n, c)


@register_statistic
class ChannelIndependence(MeanStatistic):
    """``chip``: [C] mean channel independence of each channel."""

    kind = "chip"

    def batch_sums(self, maps: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        return {"chip": channel_independence(maps).sum(0)}, len(maps)
