"""Channel removal for any other CNN through Torch-Pruning's ``DependencyGraph``.

Torch-Pruning traces the model and groups every layer whose channels must shrink together (residual
partners, depthwise convs, BatchNorms, concatenations, the consumers' inputs). Each group rooted at a conv
is one channel set, named by its first producing conv in module order; the model's classifier (the last
conv/linear layer the forward pass runs) never has its outputs pruned. Groups that run through a grouped,
non-depthwise conv (RegNet, ResNeXt) are left out: removing single channels there would change the group
sizes, which a grouped conv cannot hold.

The fallback adapter: it handles every model no family adapter is registered for. Its blocks are the
instances of torchvision's residual block classes (ResNet's ``BasicBlock`` and ``Bottleneck``,
MobileNetV2's ``InvertedResidual``); any other model has none, and each of its layers forms a block with
the layers after it in an ``nn.Sequential`` (``base.sequential_chain``). A pruned architecture
is described by the ``registry_spec`` that ``create_model`` attached (name, classes, keyword arguments)
plus the shapes of every layer that differs from a freshly built one.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..models import create_model
from ..types import ChannelSet, Keep
from .base import Adapter, Block, check_keys, shapes_only, spec_error

_LAYERS = (_ConvNd, nn.Linear, _BatchNorm)


@dataclass
class _Run:
    """What one eval-mode forward pass showed: call order of the layers and the tensors they read/wrote."""

    order: dict[str, int]
    reads: dict[str, int]
    writes: dict[str, int]


def _record_run(model: nn.Module, example_input: torch.Tensor) -> _Run:
    order: dict[str, int] = {}
    reads: dict[str, int] = {}
    writes: dict[str, int] = {}
    alive: list[torch.Tensor] = []  # keeps every recorded tensor alive so that ids stay unique

    def hook(name: str):
        def record(_module, inputs, output):
            if name not in order:
                order[name] = len(order)
                reads[name], writes[name] = id(inputs[0]), id(output)
                alive.extend((inputs[0], output))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return _Run(order, reads, writes)


class _Traced:
    """The dependency graph of ``model`` plus the facts the channel sets need."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        was_training = model.training
        model.eval()
        try:
            self.run = _record_run(model, example_input)
            self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                               verbose=False)
        finally:
            model.train(was_training)
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        self.position = {n: i for i, (n, _) in enumerate(model.named_modules())}
        unused = [n for n, m in model.named_modules() if isinstance(m, _LAYERS) and n not in self.run.order]
        if unused:
            raise ValueError(
                f"layers {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''} never run in eval mode, so "
                "their channels cannot be kept consistent when pruning; build the model without them "
                "(e.g. tv_googlenet / tv_inception_v3 with aux_logits=False)")
        self.classifier = max((n for n, m in model.named_modules() if isinstance(m, (_ConvNd, nn.Linear))),
                              key=lambda n: self.run.order[n])

    def groups(self) -> list[tp.dependency.Group]:
        return list(self.graph.get_all_groups(ignored_layers=[self.model.get_submodule(self.classifier)],
                                              root_module_types=(_ConvNd,)))

    def is_out(self, handler) -> bool:
        return self.graph.is_out_channel_pruning_fn(handler)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, _ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, _ConvNd) and m.groups > 1 and not _is_depthwise(m)


def _kind(group) -> str:
    kind = "conv"
    for dep, _ in group:
        node = dep.target
        if node.type in (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT):
            return "concat"
        if node.type == tp.ops.OPTYPE.ELEMENTWISE and node.grad_fn is not None and \
                node.grad_fn.name().startswith(("AddBackward", "SubBackward")):
            kind = "stream"
    return kind


def _channel_set(traced: _Traced, group) -> ChannelSet | None:
    modules = [(dep.target.module, dep.handler) for dep, _ in group if isinstance(dep.target.module, nn.Module)]
    if any(_is_grouped(m) for m, _ in modules):
        return None
    names = traced.names
    producers = sorted({names[m] for m, h in modules if isinstance(m, _ConvNd) and traced.is_out(h)},
                       key=traced.position.__getitem__)
    name = producers[0]
    size = traced.model.get_submodule(name).out_channels
    order = traced.run.order
    readers = sorted({names[m] for m, h in modules
                      if isinstance(m, _ConvNd) and not traced.is_out(h) and m.groups == 1 and m.in_channels == size},
                     key=order.__getitem__)
    kind = _kind(group)
    plain_producers = [p for p in producers if not _is_depthwise(traced.model.get_submodule(p))]
    all_readers = [names[m] for m, h in modules if isinstance(m, (_ConvNd, nn.Linear)) and not traced.is_out(h)
                   and not _is_depthwise(m)]
    plain = (kind == "conv" and len(plain_producers) == 1 and readers and sorted(all_readers) == sorted(readers)
             and len({traced.run.reads[r] for r in readers}) == 1)
    if plain:
        norms = tuple(_norm_after(traced, r) for r in readers)
        return ChannelSet(name=name, size=size, producers=tuple(producers), tap=readers[0],
                          consumers=tuple(readers), kind=kind, consumer_norms=norms)
    if readers:
        return ChannelSet(name=name, size=size, producers=tuple(producers), tap=readers[-1], kind=kind)
    norm = _norm_after(traced, name)
    return ChannelSet(name=name, size=size, producers=tuple(producers), tap=norm or name, tap_input=False,
                      kind=kind)


def _norm_after(traced: _Traced, layer: str) -> str:
    """The BatchNorm that reads ``layer``'s output, "" if none."""
    written = traced.run.writes[layer]
    for n, m in traced.model.named_modules():
        if isinstance(m, _BatchNorm) and traced.run.reads.get(n) == written:
            return n
    return ""


def _prune(model: nn.Module, keep: Keep, example_input: torch.Tensor) -> nn.Module:
    """A pruned deep copy of ``model``; ``keep`` maps the sets that lose channels to sorted kept indices."""
    pruned = copy.deepcopy(model)
    graph = _Traced(pruned, example_input).graph
    # Every group's indices are taken on the unpruned graph and each (layer, pruning function) is cut once
    # with the union: pruning group by group would leave Torch-Pruning's concatenation offsets of the
    # later groups stale (DenseNet), whereas original indices merge exactly.
    merged: dict[tuple, tuple] = {}
    for name, kept in keep.items():
        conv = pruned.get_submodule(name)
        removed = sorted(set(range(conv.out_channels)) - set(kept))
        if removed:
            fn = graph.get_pruner_of_module(conv).prune_out_channels
            for dep, idxs in graph.get_pruning_group(conv, fn, removed):
                key = (dep.target, dep.handler)
                merged[key] = (dep, merged.get(key, (dep, set()))[1] | set(idxs))
    group = tp.dependency.Group()
    group._DG = graph
    for dep, idxs in merged.values():
        group.add_dep(dep, sorted(idxs))
    group.prune(record_history=False)
    return pruned


# Layer attributes that pruning changes, and so the architecture spec may set.
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")


class GenericAdapter(Adapter):
    spec_keys = ("name", "num_classes", "kwargs", "shapes")

    def channel_sets(self, model: nn.Module, example_input: torch.Tensor, scope: str) -> list[ChannelSet]:
        """Scope "default": every set but residual streams; "stage"/"all": every set; in forward order."""
        traced = _Traced(model, example_input)
        sets = [s for g in traced.groups() if (s := _channel_set(traced, g)) is not None]
        if scope == "default":
            sets = [s for s in sets if s.kind != "stream"]
        return sorted(sets, key=lambda s: traced.run.order[s.name])

    def classifier_name(self, model: nn.Module, example_input: torch.Tensor) -> str:
        return _Traced(model, example_input).classifier

    def blocks(self, model: nn.Module) -> list[Block]:
        return [b for path, m in model.named_modules() if (b := _torchvision_block(path, m)) is not None]

    def apply_keep(self, model: nn.Module, keep: Keep, example_input: torch.Tensor) -> nn.Module:
        sizes = {name: model.get_submodule(name).out_channels for name in keep}
        return _prune(model, {n: k for n, k in keep.items() if len(k) < sizes[n]}, example_input)

    def architecture(self, model: nn.Module) -> dict:
        spec = getattr(model, "registry_spec", None)
        if spec is None:
            raise ValueError(f"architecture() needs a {type(model).__name__} built by "
                             "qsfm_cli.models.create_model (it records the registry name and arguments)")
        fresh = create_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
        return {**spec, "shapes": _shape_diff(fresh, model)}

    def check_architecture(self, arch: Mapping[str, Any]) -> None:
        name, kwargs = arch["name"], arch.get("kwargs", {})
        with shapes_only(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # builders' notices about their default arguments
            default = create_model(name, num_classes=arch["num_classes"])
            try:
                fresh = create_model(name, num_classes=arch["num_classes"], **kwargs)
            except Exception as err:
                raise spec_error("kwargs", dict(kwargs), f"keyword arguments {name} accepts "
                                 f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if _numel(fresh) > _numel(default):
            raise spec_error("kwargs", dict(kwargs), f"arguments that build {name} no larger than its default")
        shapes = arch.get("shapes", {})
        modules = dict(fresh.named_modules())
        check_keys("shapes", shapes, list(modules))
        for module_name, shape in shapes.items():
            _check_shape(f"shapes[{module_name!r}]", shape, modules[module_name])
        _apply_shapes(fresh, shapes)
        for module_name, module in fresh.named_modules():
            problem = _inconsistency(module)
            if problem:
                raise spec_error(f"shapes[{module_name!r}]", shapes.get(module_name), problem)

    def build(self, arch: Mapping[str, Any]) -> nn.Module:
        model = create_model(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))
        _apply_shapes(model, arch.get("shapes", {}))
        return model


def _torchvision_block(path: str, module: nn.Module) -> Block | None:
    """``module`` as a block when it is one of torchvision's residual block classes."""
    import torchvision.models.mobilenetv2 as tv_mobilenet
    import torchvision.models.resnet as tv_resnet

    if isinstance(module, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
        last = "conv2" if isinstance(module, tv_resnet.BasicBlock) else "conv3"
        return Block(path, adds_to=f"{path}.{last}",
                     shortcut=f"{path}.downsample" if module.downsample is not None else "")
    if isinstance(module, tv_mobilenet.InvertedResidual):
        return Block(path, adds_to=f"{path}.conv.{len(module.conv) - 2}" if module.use_res_connect else "")
    return None


def _numel(model: nn.Module) -> int:
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def _check_shape(field: str, shape: Any, ref: nn.Module) -> None:
    """Attributes and tensor sizes of one layer: known names, no larger than the fresh layer ``ref``."""
    check_keys(field, shape, ("attrs", "tensors"))
    attrs, tensors = shape.get("attrs", {}), shape.get("tensors", {})
    check_keys(f"{field}.attrs", attrs, [a for a in _SHAPE_ATTRS if hasattr(ref, a)])
    for attr, value in attrs.items():
        limit = getattr(ref, attr)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise spec_error(f"{field}.attrs.{attr}", value, f"an integer in [1, {limit}]")
    own = {n: t for n, t in [*ref.named_parameters(recurse=False), *ref.named_buffers(recurse=False)]
           if t is not None}
    check_keys(f"{field}.tensors", tensors, list(own))
    for tensor_name, size in tensors.items():
        limit = list(own[tensor_name].shape)
        if not isinstance(size, (list, tuple)) or len(size) != len(limit) or any(
                isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= m for d, m in zip(size, limit)):
            raise spec_error(f"{field}.tensors.{tensor_name}", size,
                             f"a size of {len(limit)} integers, each at most {limit}")


def _inconsistency(module: nn.Module) -> str:
    """What disagrees between a layer's attributes and its tensors' sizes ("" if nothing)."""
    if isinstance(module, _ConvNd):
        c_out, c_in, groups = module.out_channels, module.in_channels, module.groups
        expected = [c_out, c_in // groups, *module.kernel_size]
        if c_in % groups or c_out % groups:
            return f"in_channels {c_in} and out_channels {c_out} divisible by groups {groups}"
    elif isinstance(module, nn.Linear):
        c_out, expected = module.out_features, [module.out_features, module.in_features]
    elif isinstance(module, _BatchNorm):
        c_out, expected = module.num_features, [module.num_features]
    else:
        return ""
    sizes = {n: list(t.shape) for n, t in [*module.named_parameters(recurse=False),
                                           *module.named_buffers(recurse=False)] if t is not None}
    wanted = {"weight": expected, "bias": [c_out], "running_mean": [c_out], "running_var": [c_out]}
    for tensor_name, size in sizes.items():
        if tensor_name in wanted and size != wanted[tensor_name]:
            return f"{tensor_name} of size {wanted[tensor_name]} (what the layer's attributes give)"
    return ""


def _apply_shapes(model: nn.Module, shapes: Mapping[str, Mapping]) -> None:
    for module_name, shape in shapes.items():
        module = model.get_submodule(module_name)
        for attr, value in shape.get("attrs", {}).items():
            setattr(module, attr, value)
        for tensor_name, size in shape.get("tensors", {}).items():
            old = getattr(module, tensor_name)
            new = torch.zeros(size, dtype=old.dtype)
            setattr(module, tensor_name, nn.Parameter(new) if isinstance(old, nn.Parameter) else new)


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
