"""Counting a network's size as the papers do: multiply-accumulates of conv and linear layers (the papers'
"FLOPs") and parameters."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates of one forward pass, from torch's own FLOP counter (matmul/conv ops only)."""
    param = next(model.parameters())
    x = torch.zeros(input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


class MacsMeter:
    """MACs of pruned copies of one model, as ``count_macs`` counts them, without a forward pass each.

    Channel pruning leaves every layer's output resolution unchanged, so a conv/linear layer costs
    (its weight's element count) x (its output positions per image), the positions recorded once on the
    unpruned model. ``exact`` says whether that sum equals ``count_macs`` on the unpruned model; where it
    does not (ops other than conv/linear), every count is ``count_macs`` itself.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.input_size = (1, *example_input.shape[1:])
        self.positions: dict[str, int] = {}
        handles = [m.register_forward_hook(self._record(name)) for name, m in model.named_modules()
                   if isinstance(m, _WEIGHTED)]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example_input[:1])
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        self.exact = self._from_shapes(model) == count_macs(model, self.input_size)
        self.base = self(model)

    def _record(self, name: str):
        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            channels = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            self.positions[name] = self.positions.get(name, 0) + output.numel() // channels
        return hook

    def _from_shapes(self, model: nn.Module) -> int:
        return sum(m.weight.numel() * self.positions.get(name, 0) for name, m in model.named_modules()
                   if isinstance(m, _WEIGHTED))

    def __call__(self, model: nn.Module) -> int:
        return self._from_shapes(model) if self.exact else count_macs(model, self.input_size)

    def reduction(self, model: nn.Module) -> float:
        """Fraction of the unpruned model's MACs that ``model`` saves."""
        return 1.0 - self(model) / self.base


_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
