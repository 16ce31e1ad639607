"""Exact channel removal for ``CifarVGG``: every conv's outputs are one channel set, ``features.convI``.

A pruned network is the same class built with a smaller ``cfg``, its weights copied from the kept rows
and columns.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..models.vgg import CifarVGG
from ..types import ChannelSet, Keep
from .base import WidthsAdapter, check_width, load_bn, load_layer, on_device_of, register_adapter, spec_error


def _convs(model: CifarVGG) -> list[int]:
    return [i for i, w in enumerate(model.cfg) if w != "M"]


@register_adapter(CifarVGG)
class VGGAdapter(WidthsAdapter):
    classifier = "classifier.linear2"

    def registry_name(self, model: CifarVGG) -> str:
        return "vgg16_bn"

    def channel_sets(self, model: CifarVGG, example_input: torch.Tensor, scope: str) -> list[ChannelSet]:
        convs = _convs(model)
        sets = []
        for i, nxt in zip(convs, convs[1:] + [None]):
            name = f"features.conv{i}"
            # The last conv's map is average-pooled to 1x1 and read by the first linear layer, a per-pixel
            # linear reader of the pooled map, so compensation folds into it like into a 1x1 conv.
            tap, consumer, norm = ((f"features.conv{nxt}", f"features.conv{nxt}", f"features.norm{nxt}")
                                   if nxt is not None else ("pool", "classifier.linear1", "classifier.norm1"))
            sets.append(ChannelSet(name=name, size=model.get_submodule(name).out_channels, producers=(name,),
                                   tap=tap, consumers=(consumer,), consumer_norms=(norm,)))
        return sets

    def apply_keep(self, model: CifarVGG, keep: Keep, example_input: torch.Tensor) -> CifarVGG:
        cfg = [w if w == "M" else len(keep[f"features.conv{i}"]) for i, w in enumerate(model.cfg)]
        new = CifarVGG(cfg, self.num_classes(model), model.hidden)
        prev = None
        for i in _convs(model):
            k = keep[f"features.conv{i}"]
            load_layer(new.get_submodule(f"features.conv{i}"), model.get_submodule(f"features.conv{i}"), out=k,
                       inp=prev)
            load_bn(new.get_submodule(f"features.norm{i}"), model.get_submodule(f"features.norm{i}"), k)
            prev = k
        load_layer(new.classifier.linear1, model.classifier.linear1, inp=prev)
        load_bn(new.classifier.norm1, model.classifier.norm1, None)
        load_layer(new.classifier.linear2, model.classifier.linear2)
        return on_device_of(new, model)

    def check_widths(self, widths: Mapping[str, Any], original: CifarVGG) -> None:
        cfg = widths.get("cfg", original.cfg)
        if not isinstance(cfg, (list, tuple)) or len(cfg) != len(original.cfg):
            raise spec_error("kwargs.cfg", cfg, f"a list of {len(original.cfg)} entries, 'M' where "
                             f"{self.registry_name(original)} pools")
        for i, (width, limit) in enumerate(zip(cfg, original.cfg)):
            if limit == "M":
                if width != "M":
                    raise spec_error(f"kwargs.cfg[{i}]", width, "'M' (a pooling position)")
            else:
                check_width(f"kwargs.cfg[{i}]", width, limit)
        check_width("kwargs.hidden", widths.get("hidden", original.hidden), original.hidden)
