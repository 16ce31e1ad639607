"""What an architecture family tells the pruning and recovery stages, and the registry that finds it by
model type.

An ``Adapter`` knows one family's channel sets, how to build its pruned copy, its classifier, its blocks
and their shortcuts, the papers' rate layouts for it (``RateLayout``), and how to describe, check and
rebuild a pruned architecture as plain JSON.
``register_adapter(model_type)`` files one under the model class it handles (subclasses included);
``adapter_for`` falls back to Torch-Pruning (``generic.py``) for every other model.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from ..models import create_model
from ..types import ChannelSet, Keep

_ADAPTERS: dict[type, Adapter] = {}
SPEC_KEYS = ("name", "num_classes", "kwargs")


@dataclass(frozen=True)
class RateLayout:
    """How a published per-layer rate list maps onto channel sets: ``targets[k]`` is the set entry ``k``
    prunes, ``None`` for an entry the paper's code ignores."""

    name: str
    description: str
    targets: tuple[str | None, ...]


class shapes_only(TorchFunctionMode):
    """Context in which building a model allocates none of its layers' tensors: ``torch.empty``/``zeros``/
    ``ones`` without a device, which is how layers make their parameters and buffers, land on the meta
    device. Unlike ``torch.device("meta")`` the constructor's own arithmetic stays real, so a builder
    that computes its widths with tensors (torchvision's RegNet) still runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.empty, torch.zeros, torch.ones) and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Block:
    """One block of a family's network: module ``path`` maps the block's input to its output.

    A residual block adds a shortcut of its input to the BatchNorm output of the conv ``adds_to`` (a
    module path): module ``shortcut`` applied to the block's input, or the input itself when ``shortcut``
    is "". ``adds_to`` is "" for a block without a residual connection.
    """

    path: str
    adds_to: str = ""
    shortcut: str = ""

    def shortcut_fn(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The shortcut as a function of the block's input, in ``model`` (the original or a pruned copy)."""
        return model.get_submodule(self.shortcut) if self.shortcut else nn.Identity()


class Adapter(ABC):
    """One family's pruning rules."""

    #: Top-level keys of this family's architecture spec.
    spec_keys: tuple[str, ...] = SPEC_KEYS

    @abstractmethod
    def channel_sets(self, model: nn.Module, example_input: torch.Tensor, scope: str) -> list[ChannelSet]:
        """The sets of ``scope`` ("default", "stage" or "all"; checked by the caller), in forward order."""
        ...

    @abstractmethod
    def classifier_name(self, model: nn.Module, example_input: torch.Tensor) -> str:
        ...

    @abstractmethod
    def apply_keep(self, model: nn.Module, keep: Keep, example_input: torch.Tensor) -> nn.Module:
        """A new pruned model; ``keep`` names every set of scope "all" with its sorted kept indices
        (checked by the caller)."""
        ...

    def rate_layouts(self, model: nn.Module) -> list[RateLayout]:
        return []

    def blocks(self, model: nn.Module) -> list[Block]:
        """The family's blocks (residual or not), in forward order; [] for a family without any."""
        return []

    def block_of(self, model: nn.Module, layer: str) -> tuple[str, ...]:
        """The modules that, run one after another, compute the block around conv/linear ``layer``: the
        outermost of ``blocks`` holding it; else, inside an ``nn.Sequential``, ``layer`` and the siblings
        after it that hold no conv or linear layer (its BatchNorm, activation, pooling); else ``layer``."""
        holding = [b.path for b in self.blocks(model) if layer.startswith(b.path + ".")]
        if holding:
            return (min(holding, key=len),)
        return sequential_chain(model, layer)

    def shortcut(self, model: nn.Module, block: str, layer: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What block ``block`` adds to the BatchNorm output of ``layer``, as a function of the block's
        input; None where it adds nothing."""
        for b in self.blocks(model):
            if b.path == block and b.adds_to and b.adds_to == layer:
                return b.shortcut_fn(model)
        return None

    @abstractmethod
    def architecture(self, model: nn.Module) -> dict:
        """JSON-able spec (``name``, ``num_classes``, ``kwargs`` and whatever the family adds) that
        ``build`` turns back into this architecture."""
        ...

    @abstractmethod
    def check_architecture(self, arch: Mapping[str, Any]) -> None:
        """Raise ValueError unless ``build(arch)`` makes a consistent network no wider than the unpruned
        model of ``arch["name"]``. The top-level keys are checked already (``spec_keys``, a known name,
        ``num_classes`` a positive int, ``kwargs`` a mapping); allocate nothing sized by ``arch``: build
        under ``shapes_only()`` to look at shapes."""
        ...

    def build(self, arch: Mapping[str, Any]) -> nn.Module:
        return create_model(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))


class WidthsAdapter(Adapter):
    """A family whose pruned network is the same class built with smaller widths: ``model.widths()``
    returns the keyword arguments of its registry constructor, all of them, so a spec's ``kwargs`` may
    hold no others."""

    classifier: str = "linear"

    def classifier_name(self, model: nn.Module, example_input: torch.Tensor | None = None) -> str:
        return self.classifier

    def num_classes(self, model: nn.Module) -> int:
        return model.get_submodule(self.classifier).out_features

    @abstractmethod
    def registry_name(self, model: nn.Module) -> str:
        ...

    @abstractmethod
    def check_widths(self, widths: Mapping[str, Any], original: nn.Module) -> None:
        """Raise ValueError unless ``widths`` (a subset of ``original.widths()``'s keys) fit ``original``."""
        ...

    def architecture(self, model: nn.Module) -> dict:
        return {"name": self.registry_name(model), "num_classes": self.num_classes(model),
                "kwargs": model.widths()}

    def check_architecture(self, arch: Mapping[str, Any]) -> None:
        with shapes_only():
            original = create_model(arch["name"], num_classes=1)
        widths = arch.get("kwargs", {})
        check_keys("kwargs", widths, tuple(original.widths()))
        self.check_widths(widths, original)


def sequential_chain(model: nn.Module, layer: str) -> tuple[str, ...]:
    """``layer`` and the siblings after it in its parent ``nn.Sequential`` that hold no conv or linear
    layer; ``(layer,)`` when the parent is no ``nn.Sequential``."""
    parts = layer.split(".")
    parent_path, name = ".".join(parts[:-1]), parts[-1]
    parent = model.get_submodule(parent_path)
    if not isinstance(parent, nn.Sequential):
        return (layer,)
    prefix = f"{parent_path}." if parent_path else ""
    siblings = list(parent.named_children())
    chain = [layer]
    for sibling, module in siblings[[n for n, _ in siblings].index(name) + 1:]:
        if any(isinstance(m, (_ConvNd, nn.Linear)) for m in module.modules()):
            break
        chain.append(prefix + sibling)
    return tuple(chain)


def register_adapter(model_type: type):
    """Class decorator: an instance of the decorated ``Adapter`` handles ``model_type`` and its subclasses.
    A type registered twice warns, and the later adapter wins."""
    def register(cls: type[Adapter]) -> type[Adapter]:
        previous = _ADAPTERS.get(model_type)
        if previous is not None and type(previous) is not cls:
            warnings.warn(f"pruning adapter for {model_type.__name__} registered twice; the later "
                          f"({cls.__name__}) wins", stacklevel=2)
        _ADAPTERS[model_type] = cls()
        return cls
    return register


def adapter_for(model: nn.Module, fallback: Adapter) -> Adapter:
    """The adapter registered for ``model``'s class or its nearest registered base class, else
    ``fallback``."""
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return fallback


# ------------------------------------------------------------------------------- spec checks
def spec_error(field: str, value: Any, accepted: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ValueError(f"bad architecture spec: {field} is {shown}; accepted: {accepted}")


def check_keys(field: str, mapping: Any, accepted: Sequence[str]) -> None:
    if not isinstance(mapping, Mapping):
        raise spec_error(field, mapping, f"a mapping with keys among {', '.join(accepted)}")
    unknown = [k for k in mapping if k not in accepted]
    if unknown:
        raise spec_error(f"{field} key", unknown[0], ", ".join(accepted) or "none")


def check_width(field: str, value: Any, limit: int) -> int:
    """A positive int no larger than ``limit`` (the unpruned network's width there)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise spec_error(field, value, f"an integer in [1, {limit}]")
    return value


def check_widths(field: str, values: Any, limits: Sequence[int]) -> list[int]:
    if not isinstance(values, (list, tuple)) or len(values) != len(limits):
        raise spec_error(field, values, f"a list of {len(limits)} integers")
    return [check_width(f"{field}[{k}]", v, limit) for k, (v, limit) in enumerate(zip(values, limits))]


# --------------------------------------------------------------------------------- weight copy
def _select(t: torch.Tensor, dim: int, idx: Sequence[int] | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))


@torch.no_grad()
def load_layer(dst: nn.Conv2d | nn.Linear, src: nn.Conv2d | nn.Linear, out: Sequence[int] | None = None,
               inp: Sequence[int] | None = None) -> None:
    """Copy the kept output rows / input columns of a conv or linear layer ([out, in, ...] weight)."""
    dst.weight.copy_(_select(_select(src.weight, 0, out), 1, inp))
    if src.bias is not None:
        dst.bias.copy_(_select(src.bias, 0, out))


@torch.no_grad()
def load_bn(dst: nn.modules.batchnorm._BatchNorm, src: nn.modules.batchnorm._BatchNorm,
            idx: Sequence[int] | None) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).copy_(_select(getattr(src, name), 0, idx))
    dst.num_batches_tracked.copy_(src.num_batches_tracked)


def on_device_of(new: nn.Module, model: nn.Module) -> nn.Module:
    """``new`` on ``model``'s device and dtype, in its train/eval mode."""
    param = next(model.parameters())
    return new.to(device=param.device, dtype=param.dtype).train(model.training)
