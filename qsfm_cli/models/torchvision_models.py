"""torchvision's ImageNet models (``tv_<name>``): their published weights and the preprocessing those
weights expect.

``create_model("tv_<name>")`` builds the network untrained; ``load_pretrained`` fills in torchvision's
default weights for it (``get_model_weights(name).DEFAULT``), fetched once through ``torch.hub`` with the
sha256 prefix in the file name checked, loaded with ``weights_only=True``; offline, the error names the URL to
download elsewhere and pass as ``model.checkpoint``. ``preprocessing`` reads the weights' own transform
(``weights.transforms()``): normalization, crop and resize sizes, interpolation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..checkpoints import load_weights

PREFIX = "tv_"


@dataclass(frozen=True)
class Preprocessing:
    """What a model's published weights expect of its input: normalization (of images scaled to [0, 1]),
    evaluation crop and the shorter-side resize before it, and the resampling filter."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: int
    resize_size: int
    interpolation: str


def default_weights(name: str):
    """torchvision's default weights enum member for ``tv_<name>``."""
    import torchvision.models as tvm

    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r} is not a torchvision model name (tv_<name>)")
    try:
        return tvm.get_model_weights(name[len(PREFIX):]).DEFAULT
    except (ValueError, KeyError):
        raise ValueError(f"torchvision publishes no weights for model {name!r}") from None


def preprocessing(name: str) -> Preprocessing:
    """The input ``tv_<name>``'s default weights were trained and evaluated with."""
    transform = default_weights(name).transforms()
    return Preprocessing(tuple(transform.mean), tuple(transform.std), int(transform.crop_size[0]),
                         int(transform.resize_size[0]), transform.interpolation.value)


def load_pretrained(model: nn.Module, name: str) -> nn.Module:
    """``model`` (built by ``create_model(name)``) with torchvision's default weights for it."""
    weights = default_weights(name)
    classes = len(weights.meta["categories"])
    spec = getattr(model, "registry_spec", {})
    if spec.get("num_classes", classes) != classes:
        raise ValueError(f"torchvision's weights {weights} for {name} classify {classes} classes, the model "
                         f"{spec['num_classes']}; use a {classes}-class dataset or model.checkpoint=PATH")
    return load_weights(model, weights.url)
