"""The similarity matrix S of a set's maps, for one metric (definitions in ``qsfm_cli.similarity``)."""
from __future__ import annotations

import torch

from ..similarity import METRICS, SSIM_DEFAULTS, check_metric_options, similarity_sums
from .base import MeanStatistic, StatRequest, register_statistic


@register_statistic
class Similarity(MeanStatistic):
    """``<key>``: [C, C] S, the mean over the counted images (ssim skips an image whose maps are all
    constant over the layer: ``LayerStats.counted`` says how many were counted). The key is the metric's
    name, with the SSIM constants appended only where they differ from the defaults."""

    kind = "similarity"

    @classmethod
    def request(cls, metric: str = "ssim", *, k1: float = 0.01, k2: float = 0.03, window: int = 11,
                sigma: float = 1.5) -> StatRequest:
        """The request for S: the SSIM constants are kept only for ssim, so that requests computing the
        same S are equal."""
        check_metric_options(metric, k1, k2, window, sigma)
        params = (("k1", float(k1)), ("k2", float(k2)), ("window", int(window)),
                  ("sigma", float(sigma))) if metric == "ssim" else ()
        return StatRequest(cls.kind, metric, params)

    @classmethod
    def check(cls, request: StatRequest) -> None:
        params = dict(request.params)
        expected = set(SSIM_DEFAULTS) if request.metric == "ssim" else set()
        if request.metric in METRICS and set(params) != expected:
            raise ValueError(f"similarity {request.metric!r} takes params {', '.join(sorted(expected)) or 'none'}, "
                             f"got {', '.join(sorted(params)) or 'none'} (build it with StatRequest.similarity)")
        check_metric_options(request.metric, **{**SSIM_DEFAULTS, **params})

    @classmethod
    def key(cls, request: StatRequest) -> str:
        if dict(request.params) in ({}, SSIM_DEFAULTS):
            return request.metric
        return f"{request.metric}({','.join(f'{k}={v:g}' for k, v in request.params)})"

    def batch_sums(self, maps: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        total, counted = similarity_sums(maps, self.request.metric, **dict(self.request.params))
        return {self.request.key: total}, counted
