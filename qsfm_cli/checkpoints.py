"""Baseline weights: local files, URLs (checked by torch.hub's sha256 prefix) and built-in public weights."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# The public CIFAR-10 weights of the pytorch_resnet_cifar10 project; the hex part is a sha256 prefix.
PRETRAINED = {
    "resnet20": _AKAMASTER + "resnet20-12fca82f.th",
    "resnet32": _AKAMASTER + "resnet32-d509ac18.th",
    "resnet44": _AKAMASTER + "resnet44-014dd654.th",
    "resnet56": _AKAMASTER + "resnet56-4bfd9763.th",
    "resnet110": _AKAMASTER + "resnet110-1d1ed7c2.th",
}
# The recipe those weights were trained with: inputs in [0, 1] normalized with ImageNet statistics.
PRETRAINED_MEAN = (0.485, 0.456, 0.406)
PRETRAINED_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or matched to the model."""


def pretrained_url(model_name: str) -> str:
    try:
        return PRETRAINED[model_name]
    except KeyError:
        raise CheckpointError(
            f"no built-in pretrained weights for model {model_name!r}; available for: "
            f"{', '.join(PRETRAINED)} (CIFAR-10); pass model.checkpoint=PATH_OR_URL instead") from None


def read_state_dict(source: str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint at a path or URL; ``{'state_dict': ...}`` wrappers and ``module.`` prefixes
    are removed. Only tensors and plain containers are unpickled unless ``allow_pickle`` is set."""
    if "://" in source:
        obj = _download(source, allow_pickle)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {source!r} not found (model.checkpoint must be a file or URL)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as err:
            hint = "" if allow_pickle else " (it may hold pickled objects: model.allow_pickle=true loads those)"
            raise CheckpointError(f"cannot read checkpoint {source!r}: {_first_line(err)}{hint}") from None
    return _unwrap(obj, source)


def _download(url: str, allow_pickle: bool):
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                  weights_only=not allow_pickle, progress=False)
    except Exception as err:
        raise CheckpointError(
            f"cannot fetch checkpoint {url!r}: {_first_line(err)}; offline, download it elsewhere and pass "
            f"model.checkpoint=PATH") from None


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {source!r} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, source: str, *, allow_pickle: bool = False) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; a mismatch names the first offending keys and shapes."""
    state = read_state_dict(source, allow_pickle=allow_pickle)
    own = model.state_dict()
    # Checkpoints from PyTorch < 0.4.1 have no BatchNorm step counters; those are bookkeeping only.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                 if items]
        raise CheckpointError(f"checkpoint {source!r} does not fit model {type(model).__name__} "
                              f"({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
