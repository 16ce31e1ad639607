"""Model registry in the style of timm: ``create_model(name, **kwargs)`` over decorated constructors.

The CIFAR architectures register themselves on import, each with the ``WeightCard`` of its public weights
where there are some; ``tv_<name>`` is looked up in torchvision's model builders and ``timm_<name>`` in
timm's (both created untrained; their weights: ``torchvision_models``, ``model.checkpoint``).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..registry import import_modules
from .base import (MODELS, WeightCard, default_normalization, list_models, model_card, pretrained_models,
                   pretrained_url, register_model)
from .timm_models import create as create_timm


def _torchvision_builder(name: str) -> Callable[..., nn.Module] | None:
    import torchvision.models as tvm

    try:
        return tvm.get_model_builder(name)
    except ValueError:
        return None


def _no_torchvision_model(name: str) -> str:
    import difflib

    import torchvision.models as tvm

    close = difflib.get_close_matches(name, tvm.list_models(), n=5, cutoff=0.5)
    return (f"model.name=tv_{name}; accepted: tv_<a model of torchvision.models.list_models()>: torchvision has no "
            f"model {name!r} (close names: {', '.join('tv_' + c for c in close) or 'none'})")


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a model by registry name; ``tv_<name>`` builds torchvision's ``<name>`` untrained."""
    if name in MODELS:
        model = MODELS.get(name)(num_classes=num_classes, **kwargs)
    elif name.startswith("tv_") and (builder := _torchvision_builder(name[3:])) is not None:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
    elif name.startswith("tv_"):
        raise ValueError(_no_torchvision_model(name[3:]))
    elif name.startswith("timm_"):
        model = create_timm(name, num_classes, **kwargs)
    else:
        raise ValueError(MODELS.unknown(name, also=("tv_<torchvision model name>", "timm_<timm model name>")))
    # What rebuilds a model that no pruning adapter describes by its own fields (qsfm_cli.pruning's
    # Torch-Pruning fallback): a class does not know which builder made it.
    model.registry_spec = {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs)}
    return model


import_modules(__name__, __path__)

__all__ = ["MODELS", "WeightCard", "create_model", "default_normalization", "list_models", "model_card",
           "pretrained_models", "pretrained_url", "register_model"]
