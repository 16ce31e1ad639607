"""Model registry in the style of timm: ``create_model(name, **kwargs)`` over decorated constructors.

The CIFAR architectures register themselves on import; ``tv_<name>`` is looked up in torchvision's model
builders and ``timm_<name>`` in timm's (both created untrained; their weights: ``torchvision_models``,
``model.checkpoint``).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the built-in CIFAR models (torchvision names are accepted too, as ``tv_<name>``)."""
    return sorted(_REGISTRY)


def _torchvision_builder(name: str) -> Callable[..., nn.Module] | None:
    import torchvision.models as tvm

    try:
        return tvm.get_model_builder(name)
    except ValueError:
        return None


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a model by registry name; ``tv_<name>`` builds torchvision's ``<name>`` untrained."""
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    if name.startswith("tv_"):
        builder = _torchvision_builder(name[3:])
        if builder is not None:
            model = builder(weights=None, num_classes=num_classes, **kwargs)
            # What rebuilds it after pruning (qsfm_cli.pruning.architecture): a torchvision class does not
            # know which builder made it.
            model.registry_spec = {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs)}
            return model
    if name.startswith("timm_"):
        from .timm_models import create

        return create(name, num_classes, **kwargs)
    raise ValueError(
        f"unknown model {name!r}; accepted: {', '.join(list_models())}, tv_<torchvision model name> or "
        f"timm_<timm model name>"
    )


from . import mobilenetv2, resnet_cifar, vgg  # noqa: E402,F401  (fill the registry)
