"""timm models (``timm_<name>``, optional: ``pip install qsfm-cli[timm]``), built untrained by
``timm.create_model`` and recorded so that a pruned one can be rebuilt (``pruning.architecture``).
Weights come from a local file (``model.checkpoint``); they are pruned through Torch-Pruning like the
torchvision models.
"""
from __future__ import annotations

import math

from torch import nn

from .torchvision_models import Preprocessing

PREFIX = "timm_"


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need the timm package: pip install 'qsfm-cli[timm]'") from None
    return timm


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
    """``timm.create_model(<name>, pretrained=False, num_classes=..., **kwargs)`` for ``timm_<name>``."""
    timm = _timm()
    arch = name[len(PREFIX):]
    if not timm.is_model(arch):
        raise ValueError(f"model.name={name}; accepted: timm_<a name in timm.list_models()> (timm has no {arch!r})")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def preprocessing(name: str) -> Preprocessing:
    """The input the default pretrained weights of ``timm_<name>`` expect (timm's data config)."""
    timm = _timm()
    config = timm.data.resolve_model_data_config(create(name, num_classes=1))
    crop = int(config["input_size"][-1])
    return Preprocessing(tuple(config["mean"]), tuple(config["std"]), crop,
                         int(math.floor(crop / config["crop_pct"])), config["interpolation"])
