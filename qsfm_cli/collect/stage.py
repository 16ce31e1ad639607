"""Collect stage: the statistics of a model's channel sets over training images, cached by content."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..cache import RunContext, fingerprint, model_fingerprint
from ..data import ImageSet
from ..types import ChannelSet, LayerStats
from .collector import collect_stats
from .base import StatRequest


@dataclass(frozen=True)
class CollectSpec:
    """The ``collect`` config node: training images whose feature maps are collected, and the batch."""

    num_images: int = 512
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("num_images", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"collect.{name}={getattr(self, name)}; accepted: >= 1")


def content_key(model: nn.Module, sets: list[ChannelSet], images: ImageSet) -> str:
    """What collected statistics depend on: the model's weights, the images and the channel sets."""
    return fingerprint(model_fingerprint(model), images.images, images.mean, images.std, [asdict(s) for s in sets])


def collect_stage(model: nn.Module, sets: list[ChannelSet], images: ImageSet, groups: list[set[StatRequest]],
                  spec: CollectSpec, ctx: RunContext, *, key: str, status: str = "stats",
                  device: str | torch.device = "cpu", progress: bool = False) -> dict[str, LayerStats]:
    """Statistics for every request group, one cache entry per group (e.g. the scorer's requests and the
    recovery's, so that runs differing only in recovery share the scorer's entry), under ``key`` (see
    ``content_key``). Whatever groups are missing are collected together in one pass over the images;
    the cache status goes under ``status``."""
    cache = ctx.cache
    layout = [f.name for f in fields(LayerStats)]     # entries stored with another layout are not reused
    keys = {fingerprint("stats", key, sorted(map(repr, group)), layout): group for group in groups if group}
    found: dict[str, dict] = {}

    def collect_missing(key: str) -> dict[str, dict]:
        missing = [k for k in keys if k == key or (k not in found and not cache.contains("stats", k))]
        requests = set().union(*(keys[k] for k in missing))
        raw = {name: asdict(st) for name, st in collect_stats(
            model, sets, images, requests, batch_size=spec.batch_size, device=device, progress=progress).items()}
        for k in missing:
            if k != key:
                cache.put("stats", k, raw)
                found[k] = raw
        return raw

    hits = []
    for k in keys:
        if k not in found:
            found[k], hit = cache.get_or_compute("stats", k, lambda k=k: collect_missing(k))
            hits.append(hit)
    ctx.cache_status[status] = "none" if not keys else "hit" if all(hits) else "miss"
    return merge_stats(found.values())


def merge_stats(raws) -> dict[str, LayerStats]:
    """One ``LayerStats`` per set from several collections of it (fields filled in any of them)."""
    merged: dict[str, dict] = {}
    for raw in raws:
        for name, entries in raw.items():
            into = merged.setdefault(name, dict(entries))
            for key, value in entries.items():
                if isinstance(value, dict):
                    into[key] = {**into[key], **value}
                elif into[key] is None:
                    into[key] = value
    return {name: LayerStats(**entries) for name, entries in merged.items()}
