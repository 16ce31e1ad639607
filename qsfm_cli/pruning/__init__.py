"""Physical channel removal: smaller tensors, the same function as the masked network.

``channel_sets`` lists what can be pruned, ``apply_keep`` builds the pruned copy, ``architecture`` /
``build_model`` describe and rebuild a pruned architecture as plain JSON (no pickled modules);
``blocks``, ``block_of``, ``shortcut`` and ``stream_blocks`` tell a recovery how the network is built of
blocks. Each model
family has its adapter, found by the model's type (``register_adapter``; one module per family here:
``resnet_cifar``, ``vgg``, ``mobilenetv2``); every other CNN goes through Torch-Pruning (``generic``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..checkpoints import state_mismatch
from ..models import create_model, list_models
from ..types import ChannelSet, Keep
from .base import (Adapter, Block, RateLayout, adapter_for, check_keys, register_adapter, shapes_only,
                   spec_error)
from .generic import GenericAdapter
from . import mobilenetv2, resnet_cifar, vgg  # noqa: F401,E402  (register the family adapters)

SCOPES = ("default", "stage", "all")
FALLBACK = GenericAdapter()

__all__ = ["SCOPES", "Adapter", "Block", "RateLayout", "apply_keep", "architecture", "block_of", "blocks",
           "build_model", "channel_sets", "classifier_name", "get_adapter", "prunable_channels", "rate_layouts",
           "register_adapter", "shortcut", "stream_blocks"]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family; Torch-Pruning's for a model no family adapter handles."""
    return adapter_for(model, FALLBACK)


def channel_sets(model: nn.Module, example_input: torch.Tensor, scope: str = "default") -> list[ChannelSet]:
    """The channel sets of ``scope``, in forward order.

    "default": ResNets block-internal, VGG every conv, MobileNetV2 the hidden channels of blocks with an
    expand conv, other CNNs every Torch-Pruning group except residual streams; "stage" adds the residual
    streams (ResNet stem and stage outputs, MobileNetV2 stem and block outputs); "all" is every set.
    """
    if scope not in SCOPES:
        raise ValueError(f"prune.scope={scope}; accepted: {', '.join(SCOPES)}")
    return get_adapter(model).channel_sets(model, example_input, scope)


def prunable_channels(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Every prunable channel set, by name, with its channel count."""
    return {s.name: s.size for s in channel_sets(model, example_input, "all")}


def classifier_name(model: nn.Module, example_input: torch.Tensor) -> str:
    """Module path of the final classifier, whose outputs are never pruned."""
    return get_adapter(model).classifier_name(model, example_input)


def rate_layouts(model: nn.Module) -> list[RateLayout]:
    """Published per-layer rate layouts for ``model`` (CIFAR ResNets: CHIP's and HRank's)."""
    return get_adapter(model).rate_layouts(model)


def blocks(model: nn.Module) -> list[Block]:
    """The blocks of ``model``'s family (residual or not), in forward order."""
    return get_adapter(model).blocks(model)


def block_of(model: nn.Module, layer: str) -> tuple[str, ...]:
    """The modules that, run one after another, compute the block around conv/linear ``layer`` (its
    family's block holding it, else ``layer`` with the non-conv layers that follow it in an
    ``nn.Sequential``, else ``layer`` alone)."""
    return get_adapter(model).block_of(model, layer)


def shortcut(model: nn.Module, block: str, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What block ``block`` adds to the BatchNorm output of ``layer``, as a function of the block's input;
    None where it adds nothing."""
    return get_adapter(model).shortcut(model, block, layer)


def stream_blocks(model: nn.Module, channel_set: ChannelSet) -> list[Block]:
    """The blocks that write ``channel_set``'s map, in forward order: those holding one of its producers.
    For a residual stream (``kind == "stream"``) these are the blocks along the stream: each adds into
    what the one before it wrote, and the first reads what precedes the stream, so running them one after
    another from the first one's input computes the stream. A set written by no block (a stem conv) has
    none."""
    return [b for b in blocks(model) if any(p.startswith(b.path + ".") for p in channel_set.producers)]


def apply_keep(model: nn.Module, keep: Mapping[str, Sequence[int]], example_input: torch.Tensor) -> nn.Module:
    """A new, physically pruned model keeping ``keep[name]`` channels of each named set (sets not named
    keep all); ``model`` is left untouched."""
    adapter = get_adapter(model)
    sets = adapter.channel_sets(model, example_input, "all")
    complete = _checked_keep(sets, keep, lambda: adapter.classifier_name(model, example_input))
    return adapter.apply_keep(model, complete, example_input)


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
    """JSON-able description that ``build_model`` turns back into this (possibly pruned) architecture:
    the registry name, the number of classes and the family's own fields (the widths of a CIFAR model;
    for any other model the ``create_model`` arguments and the shapes of every layer that differs from a
    freshly built one)."""
    return get_adapter(model).architecture(model)


def build_model(arch: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild (untrained) the architecture ``architecture`` described; load the state dict after.

    The spec is checked before anything is built from it: a known model name, only the keys its family
    knows, positive integer widths no larger than the unpruned network's, consistent shortcut and layer
    shapes; with ``state_dict``, its tensors must have exactly the sizes the spec gives. Anything else is
    one ValueError line.
    """
    adapter = _checked_adapter(arch)
    if state_dict is not None:
        with shapes_only():
            expected = adapter.build(arch).state_dict()
        _check_state(expected, state_dict)
    return adapter.build(arch)


def _checked_adapter(arch: Any) -> Adapter:
    check_keys("architecture", arch, GenericAdapter.spec_keys)
    for key in ("name", "num_classes"):
        if key not in arch:
            raise spec_error("architecture keys", sorted(arch), "name, num_classes and optionally kwargs")
    name, num_classes = arch["name"], arch["num_classes"]
    if not isinstance(name, str):
        raise spec_error("name", name, f"{', '.join(list_models())} or tv_<torchvision model name>")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise spec_error("num_classes", num_classes, "a positive integer")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise spec_error("kwargs", kwargs, "a mapping of argument names to values")
    if name in list_models():
        with shapes_only():
            adapter = get_adapter(create_model(name, num_classes=1))
    else:
        adapter = FALLBACK
    check_keys("architecture", arch, adapter.spec_keys)
    adapter.check_architecture(arch)
    return adapter


def _check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("bad pruned model: its state_dict is not a mapping of names to tensors")
    mismatch = state_mismatch(expected, state, "spec")
    if mismatch:
        raise ValueError(f"bad pruned model: its state_dict does not fit its architecture spec ({mismatch})")
