"""Physical channel removal: smaller tensors, the same function as the masked network.

``channel_sets`` lists what can be pruned, ``apply_keep`` builds the pruned copy, ``architecture`` /
``build_model`` describe and rebuild a pruned architecture as plain JSON (no pickled modules). The CIFAR
models have their own exact rules (``cifar.py``); every other CNN goes through Torch-Pruning
(``generic.py``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..models import create_model
from ..types import ChannelSet, Keep
from . import cifar, generic
from .cifar import RateLayout

SCOPES = ("default", "stage", "all")

__all__ = ["SCOPES", "RateLayout", "apply_keep", "architecture", "build_model", "channel_sets",
           "classifier_name", "prunable_channels", "rate_layouts"]


def channel_sets(model: nn.Module, example_input: torch.Tensor, scope: str = "default") -> list[ChannelSet]:
    """The channel sets of ``scope``, in forward order.

    "default": ResNets block-internal, VGG every conv, MobileNetV2 the hidden channels of blocks with an
    expand conv, other CNNs every Torch-Pruning group except residual streams; "stage" adds the residual
    streams (ResNet stem and stage outputs, MobileNetV2 stem and block outputs); "all" is every set.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown prune.scope {scope!r}; accepted: {', '.join(SCOPES)}")
    if cifar.is_cifar(model):
        return cifar.channel_sets(model, scope)
    return generic.channel_sets(model, example_input, scope)


def prunable_channels(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Every prunable channel set, by name, with its channel count."""
    return {s.name: s.size for s in channel_sets(model, example_input, "all")}


def classifier_name(model: nn.Module, example_input: torch.Tensor) -> str:
    """Module path of the final classifier, whose outputs are never pruned."""
    if cifar.is_cifar(model):
        return cifar.classifier_name(model)
    return generic.classifier_name(model, example_input)


def rate_layouts(model: nn.Module) -> list[RateLayout]:
    """Published per-layer rate layouts for ``model`` (CIFAR ResNets: CHIP's and HRank's)."""
    return cifar.rate_layouts(model) if cifar.is_cifar(model) else []


def apply_keep(model: nn.Module, keep: Mapping[str, Sequence[int]], example_input: torch.Tensor) -> nn.Module:
    """A new, physically pruned model keeping ``keep[name]`` channels of each named set (sets not named
    keep all); ``model`` is left untouched."""
    sets = channel_sets(model, example_input, "all")
    complete = _checked_keep(sets, keep, lambda: classifier_name(model, example_input))
    if cifar.is_cifar(model):
        return cifar.apply_keep(model, complete)
    changed = {s.name: complete[s.name] for s in sets if len(complete[s.name]) < s.size}
    return generic.apply_keep(model, changed, example_input)


def _checked_keep(sets: list[ChannelSet], keep: Mapping[str, Sequence[int]], classifier) -> Keep:
    sizes = {s.name: s.size for s in sets}
    for name, kept in keep.items():
        if name not in sizes:
            if name == classifier():
                raise ValueError(f"{name!r} is the classifier: its outputs are the class logits and are never "
                                 "pruned")
            raise ValueError(f"unknown channel set {name!r}; prunable sets: {', '.join(sizes)}")
        idx = [int(i) for i in kept]
        bad = [i for i in idx if not 0 <= i < sizes[name]]
        if bad or len(set(idx)) != len(idx):
            raise ValueError(f"keep[{name!r}] must hold distinct indices in [0, {sizes[name]}); got {sorted(idx)}")
        if not idx:
            raise ValueError(f"keep[{name!r}] is empty: every channel set keeps at least one channel")
    return {name: sorted(int(i) for i in keep.get(name, range(size))) for name, size in sizes.items()}


# --------------------------------------------------------------------------------------- architecture
def architecture(model: nn.Module) -> dict:
    """JSON-able description that ``build_model`` turns back into this (possibly pruned) architecture.

    CIFAR models are described by their widths; any other model by the ``registry_spec`` that
    ``create_model`` attached to it plus the shapes of every layer that differs from a freshly built one.
    """
    if cifar.is_cifar(model):
        return {"name": cifar.registry_name(model), "num_classes": cifar.num_classes(model),
                "kwargs": model.widths()}
    spec = getattr(model, "registry_spec", None)
    if spec is None:
        raise ValueError(f"architecture() needs a {type(model).__name__} built by qsfm_cli.models.create_model "
                         "(it records the registry name and arguments)")
    fresh = create_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    return {**spec, "shapes": _shape_diff(fresh, model)}


def build_model(arch: Mapping) -> nn.Module:
    """Rebuild (untrained) the architecture ``architecture`` described; load the state dict after."""
    model = create_model(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))
    for module_name, shape in arch.get("shapes", {}).items():
        module = model.get_submodule(module_name)
        for attr, value in shape["attrs"].items():
            setattr(module, attr, value)
        for tensor_name, size in shape["tensors"].items():
            old = getattr(module, tensor_name)
            new = torch.zeros(size, dtype=old.dtype)
            setattr(module, tensor_name, nn.Parameter(new) if isinstance(old, nn.Parameter) else new)
    return model


_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")


def _shape_diff(fresh: nn.Module, model: nn.Module) -> dict:
    diff = {}
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        ref = fresh_modules[name]
        tensors = {t: list(v.shape) for t, v in [*module.named_parameters(recurse=False),
                                                  *module.named_buffers(recurse=False)]
                   if v is not None and list(v.shape) != list(getattr(ref, t).shape)}
        attrs = {a: getattr(module, a) for a in _SHAPE_ATTRS
                 if hasattr(module, a) and getattr(module, a) != getattr(ref, a)}
        if tensors or attrs:
            diff[name] = {"attrs": attrs, "tensors": tensors}
    return diff

