"""Model registry in the style of timm: ``create_model(name, **kwargs)`` over decorated constructors.

The CIFAR architectures register themselves on import, each with the ``WeightCard`` of its public weights
where there are some; ``tv_<name>`` is looked up in torchvision's model builders and ``timm_<name>`` in
timm's (both created untrained; their weights: ``torchvision_models``, ``model.checkpoint``).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_CARDS: dict[str, WeightCard] = {}


@dataclass(frozen=True)
class WeightCard:
    """Public weights of a registered model and the recipe they expect.

    ``url``'s file name carries ``sha256``, a prefix of the file's SHA-256 (``name-<sha256>.ext``), which is
    what ``torch.hub`` checks a download against; ``mean``/``std`` normalize inputs scaled to [0, 1];
    ``input_size`` is (channels, height, width); ``num_classes`` and ``dataset`` are what the weights were
    trained on (a ``qsfm_cli.data`` dataset name).
    """

    url: str
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]
    num_classes: int
    dataset: str
    source: str
    license: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{8,64}", self.sha256):
            raise ValueError(f"WeightCard sha256 {self.sha256!r} must be 8 to 64 lowercase hex digits")
        # torch.hub reads the expected hash from the file name only, so a card whose URL does not carry
        # it would download unchecked.
        if f"-{self.sha256}." not in self.url.rsplit("/", 1)[-1]:
            raise ValueError(f"WeightCard url {self.url!r} must name its file <name>-{self.sha256}.<ext>")


def register_model(fn: Callable[..., nn.Module] | None = None, *, card: WeightCard | None = None):
    """Register ``fn`` under its function name, with the card of its public weights if any; usable as
    ``@register_model`` or ``register_model(fn, card=...)``. A name registered twice warns, and the later
    definition wins."""
    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            warnings.warn(f"model {name!r} registered twice; the later definition wins", stacklevel=3)
        _REGISTRY[name] = fn
        _CARDS.pop(name, None)
        if card is not None:
            _CARDS[name] = card
        return fn

    return register if fn is None else register(fn)


def list_models() -> list[str]:
    """Names of the built-in CIFAR models (torchvision names are accepted too, as ``tv_<name>``)."""
    return sorted(_REGISTRY)


def pretrained_models() -> list[str]:
    """Registered models that have public weights, in registration order."""
    return list(_CARDS)


def model_card(name: str) -> WeightCard | None:
    """The card of model ``name``'s public weights; None for a model registered without one and for any
    other name (``tv_*`` models are built untrained; ``create_model`` is what checks a name)."""
    return _CARDS.get(name)


def default_normalization(model_name: str, dataset_name: str
                          ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` that inputs of ``dataset_name`` need for ``model_name``: its public weights' recipe
    when they were trained on that dataset, else None (the dataset's own statistics)."""
    card = model_card(model_name)
    if card is None or card.dataset != dataset_name:
        return None
    return card.mean, card.std


def _torchvision_builder(name: str) -> Callable[..., nn.Module] | None:
    import torchvision.models as tvm

    try:
        return tvm.get_model_builder(name)
    except ValueError:
        return None


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a model by registry name; ``tv_<name>`` builds torchvision's ``<name>`` untrained."""
    if name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    elif name.startswith("tv_") and (builder := _torchvision_builder(name[3:])) is not None:
        model = builder(weights=None, num_classes=num_classes, **kwargs)
    elif name.startswith("timm_"):
        from .timm_models import create

        model = create(name, num_classes, **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(list_models())}, "
                         "tv_<torchvision model name> or timm_<timm model name>")
    # What rebuilds a model that no pruning adapter describes by its own fields (qsfm_cli.pruning's
    # Torch-Pruning fallback): a class does not know which builder made it.
    model.registry_spec = {"name": name, "num_classes": num_classes, "kwargs": dict(kwargs)}
    return model


from . import mobilenetv2, resnet_cifar, vgg  # noqa: E402,F401  (fill the registry)
