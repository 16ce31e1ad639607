"""The model registry and weight cards: what every architecture module of this package registers into."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..checkpoints import CheckpointError
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "model.name", name_of=lambda fn: fn.__name__)
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
        MODELS.register(fn)
        _CARDS.pop(name, None)
        if card is not None:
            _CARDS[name] = card
        return fn

    return register if fn is None else register(fn)


def list_models() -> list[str]:
    """Names of the built-in CIFAR models (torchvision names are accepted too, as ``tv_<name>``)."""
    return MODELS.names()


def pretrained_models() -> list[str]:
    """Registered models that have public weights, in registration order."""
    return list(_CARDS)


def model_card(name: str) -> WeightCard | None:
    """The card of model ``name``'s public weights; None for a model registered without one and for any
    other name (``tv_*`` models are built untrained; ``create_model`` is what checks a name)."""
    return _CARDS.get(name)


def pretrained_url(model_name: str) -> str:
    """The URL of ``model_name``'s public weights, from its card."""
    card = model_card(model_name)
    if card is None:
        available = ", ".join(f"{name} ({model_card(name).dataset})" for name in pretrained_models())
        raise CheckpointError(f"no built-in pretrained weights for model {model_name!r}; available for: "
                              f"{available}; pass model.checkpoint=PATH_OR_URL instead")
    return card.url


def default_normalization(model_name: str, dataset_name: str
                          ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` that inputs of ``dataset_name`` need for ``model_name``: its public weights' recipe
    when they were trained on that dataset, else None (the dataset's own statistics)."""
    card = model_card(model_name)
    if card is None or card.dataset != dataset_name:
        return None
    return card.mean, card.std
