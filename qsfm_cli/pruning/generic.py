"""Channel removal for any other CNN through Torch-Pruning's ``DependencyGraph``.

Torch-Pruning traces the model and groups every layer whose channels must shrink together (residual
partners, depthwise convs, BatchNorms, concatenations, the consumers' inputs). Each group rooted at a conv
is one channel set, named by its first producing conv in module order; the model's classifier (the last
conv/linear layer the forward pass runs) never has its outputs pruned. Groups that run through a grouped,
non-depthwise conv (RegNet, ResNeXt) are left out: removing single channels there would change the group
sizes, which a grouped conv cannot hold.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..types import ChannelSet

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


def channel_sets(model: nn.Module, example_input: torch.Tensor, scope: str) -> list[ChannelSet]:
    """Scope "default": every set but residual streams; "stage"/"all": every set; in forward order."""
    traced = _Traced(model, example_input)
    sets = [s for g in traced.groups() if (s := _channel_set(traced, g)) is not None]
    if scope == "default":
        sets = [s for s in sets if s.kind != "stream"]
    return sorted(sets, key=lambda s: traced.run.order[s.name])


def classifier_name(model: nn.Module, example_input: torch.Tensor) -> str:
    return _Traced(model, example_input).classifier


def apply_keep(model: nn.Module, keep: dict[str, list[int]], example_input: torch.Tensor) -> nn.Module:
    """A pruned deep copy of ``model``; ``keep`` maps set names to sorted kept indices."""
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
