"""Baselines trained once and shared: models with no public weights (VGG-16, MobileNetV2, CIFAR-100 ...)
are trained from scratch by the first run that needs them and loaded by every later one.

The cache key covers everything that determines the weights: model name and constructor arguments, the
training data (name and a hash of its bytes and normalization), the recipe and the seed. The ``Execution``
(amp, channels_last, compile, data path ...) is left out: it changes the speed, not the protocol. The training itself runs in ``<key>.run/`` with ``resume=True``, so a killed job
continues where it stopped; concurrent jobs wait on a file lock instead of training the same baseline twice.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints
from .cache import Cache, fingerprint
from .data import ImageSet
from .models import create_model, pretrained_url
from .models.torchvision_models import load_pretrained
from .train import STATE_FILE, Execution, TrainRecipe, train

log = logging.getLogger(__name__)

KIND = "baselines"


def baseline_key(model_name: str, num_classes: int, train_set: ImageSet, recipe: TrainRecipe, *, seed: int,
                 model_kwargs: dict[str, Any] | None = None) -> str:
    """``<model>-<dataset>-<hash>``: readable in a directory listing, unique by content."""
    digest = fingerprint(model_name, model_kwargs or {}, num_classes, train_set.name, train_set.content_key(),
                         list(train_set.mean), list(train_set.std), recipe.to_dict(), seed)
    return f"{model_name}-{train_set.name or 'data'}-{digest}"


def trained_baseline(model_name: str, num_classes: int, train_set: ImageSet, test_set: ImageSet | None,
                     recipe: TrainRecipe, *, seed: int, device: str | torch.device, cache_dir: Path,
                     model_kwargs: dict[str, Any] | None = None, execution: Execution | None = None,
                     progress: bool = True) -> nn.Module:
    """``create_model(model_name, ...)`` trained with ``recipe`` from a ``seed``-determined init, from
    ``cache_dir/baselines/<key>.pt`` when an earlier run trained it already. Returned on ``device``."""
    kwargs = dict(model_kwargs or {})
    cache = Cache(cache_dir)
    key = baseline_key(model_name, num_classes, train_set, recipe, seed=seed, model_kwargs=kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(model_name, num_classes=num_classes, **kwargs)

    def fit() -> dict[str, Any]:
        log.info("baseline %s: cache miss, training %d epochs on %s (%d images) -> %s", model_name,
                 recipe.epochs, train_set.name or "data", len(train_set), cache.path(KIND, key))
        run_dir = cache.root / KIND / f"{key}.run"
        result = train(model, train_set, test_set, recipe, device=device, seed=seed, execution=execution,
                       run_dir=run_dir, resume=True, progress=progress)
        return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "meta": {"model": model_name, "model_kwargs": kwargs, "num_classes": num_classes,
                         "dataset": train_set.name, "recipe": recipe.to_dict(), "seed": seed,
                         "test_top1": result.test_top1}}

    entry, hit = cache.get_or_compute(KIND, key, fit)
    # The weights live in the cache entry now; the training checkpoint goes only after that is stored.
    (cache.root / KIND / f"{key}.run" / STATE_FILE).unlink(missing_ok=True)
    if hit:
        model.load_state_dict(entry["state_dict"])
        top1 = entry["meta"].get("test_top1")
        log.info("baseline %s: cache hit %s (test top-1 %s)", model_name, cache.path(KIND, key),
                 "n/a" if top1 is None else f"{top1:.2f}%")
    return model.to(device)


def load_baseline(model_name: str, train_set: ImageSet, test_set: ImageSet | None, *,
                  model_kwargs: dict[str, Any] | None = None, checkpoint: str | None = None,
                  pretrained: bool = False, allow_pickle: bool = False, recipe: TrainRecipe | None = None,
                  seed: int = 0, device: str | torch.device = "cpu", cache_dir: Path,
                  execution: Execution | None = None, progress: bool = True) -> nn.Module:
    """Baseline stage: the unpruned model with its weights, from ``checkpoint`` (a file or URL), the
    model's public weights (``pretrained``), or trained once with ``recipe`` (``trained_baseline``)."""
    kwargs = dict(model_kwargs or {})
    model = create_model(model_name, num_classes=train_set.num_classes, **kwargs)
    if checkpoint:
        return checkpoints.load_weights(model, checkpoint, allow_pickle=allow_pickle)
    if pretrained and model_name.startswith("tv_"):
        return load_pretrained(model, model_name)     # torchvision's own weights API
    if pretrained:
        return checkpoints.load_weights(model, pretrained_url(model_name))
    if recipe is not None:
        return trained_baseline(model_name, train_set.num_classes, train_set, test_set, recipe, seed=seed,
                                device=device, cache_dir=cache_dir, model_kwargs=kwargs, execution=execution,
                                progress=progress)
    raise ValueError(f"model {model_name!r} has no weights: set model.checkpoint=PATH_OR_URL, "
                     f"model.pretrained=true, or baseline.train=true")
