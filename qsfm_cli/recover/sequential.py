"""Sequential least-squares reconstruction (channel-pruning reconstruction, He et al. 2017; ThiNet).

``lstsq`` fits every consumer on the unpruned network's statistics, as if every earlier layer were intact;
the errors of successive layers then add up. Here the consumers are refit in forward order on N unlabeled
images, each from what the ALREADY PRUNED (and already refit) network feeds it: per consumer, the ridge
least squares

    min_{W, c}  sum over images, pixels  || W x_p + c - t ||^2  +  lam ||W||^2

with ``x_p`` the pruned consumer's input patch (im2col over its kernel, every kept input channel) and ``t``
the original consumer's output at the kept output channels. Where the consumer's BatchNorm output is
added to a residual stream, ``t`` also carries what the pruned stream lacks (original shortcut minus
pruned shortcut, divided by the BatchNorm's scale), so that every block output is fitted back onto the
original network's and the stream's error does not accumulate. ``c`` goes into the consumer's bias, or
into the running mean of the BatchNorm after it; a consumer with neither is fitted without a constant.

The normal equations X^T X, X^T T are accumulated over batches (``positions`` sampled pixels per image),
so no layer's maps are kept beyond a batch, except the inputs of the block being fitted: the network is
walked block by block (``qsfm_cli.pruning.block_of``: the adapter of the model's family says what a
block is and what its shortcut adds), each block's input held for the N images for both networks and
pushed through the block once it is fitted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..data import ImageSet
from ..loaders import DeviceLoader
from ..pruning import block_of, shortcut
from ..types import ChannelSet, Keep, SetStatus
from .base import Recovery, register_recovery
from .compensate import LeastSquares

TARGETS = ("block", "layer")
_NO_CONSUMER = ("its map is not read by plain conv/linear layers only (residual stream, concatenation or "
                "depthwise conv), so there is no layer to refit for it")


@dataclass
class Block:
    """A block of the pruned network being reconstructed: ``modules`` (see ``block_of``) and the
    consumers inside it, in forward order, with the kept output channels of each (None: all)."""

    modules: tuple[str, ...]
    layers: list[str]
    out_keep: dict[str, list[int] | None]
    keep: list[int] | None = None  # kept channels of the block's output (None: all)
    chained: bool = False          # its input is the previous block's output

    @property
    def name(self) -> str:
        return self.modules[0] if len(self.modules) == 1 else f"{self.modules[0]}..{self.modules[-1]}"

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for name in self.modules:
            x = model.get_submodule(name)(x)
        return x


class _Stop(Exception):
    """Raised by a capturing hook: the rest of the forward pass is not needed."""


def _capture(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: nn.Module, *,
             output: bool, stop: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s input (or output) while ``fn(x)`` runs, and what ``fn`` returned; with ``stop``,
    nothing after ``module`` is computed and None is returned."""
    seen: list[torch.Tensor] = []

    def grab(value: torch.Tensor) -> None:
        # When the forward goes on, a later in-place op (an inplace ReLU) could overwrite what was seen.
        seen.append(value.detach() if stop else value.detach().clone())
        if stop:
            raise _Stop

    handle = (module.register_forward_hook(lambda _m, _a, out: grab(out)) if output
              else module.register_forward_pre_hook(lambda _m, args: grab(args[0])))
    result = None
    try:
        result = fn(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"module {type(module).__name__} did not run")
    return seen[0], result


def _trace(model: nn.Module, blocks: list[Block], example: torch.Tensor,
           kept_out: dict[str, list[int]]) -> list[Block] | str:
    """Blocks in the order the forward pass runs them, their layers too, each marked ``chained`` where it
    reads exactly what the previous one wrote and given the kept channels of its output (those of the
    last conv or linear layer it runs); a reason string when a block does not run exactly once."""
    reads: dict[int, list[int]] = {i: [] for i in range(len(blocks))}
    writes: dict[int, int] = {}
    calls: list[str] = []
    alive: list[torch.Tensor] = []     # keeps the recorded tensors alive so that their ids stay unique

    def enter(i: int):
        def hook(_m, args):
            reads[i].append(id(args[0]))
            calls.append(i)
            alive.append(args[0])
        return hook

    def leave(i: int):
        def hook(_m, _a, out):
            writes[i] = id(out)
            alive.append(out)
        return hook

    handles = [model.get_submodule(b.modules[0]).register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [model.get_submodule(b.modules[-1]).register_forward_hook(leave(i)) for i, b in enumerate(blocks)]
    handles += [m.register_forward_pre_hook(lambda _m, _a, n=n: calls.append(n)) for n, m in model.named_modules()
                if isinstance(m, (_ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    for i, block in enumerate(blocks):
        if len(reads[i]) != 1:
            return f"block {block.name} runs {len(reads[i])} times per forward pass, not once"
    order = [c for c in calls if isinstance(c, int)]
    for i, block in enumerate(blocks):
        inside = [c for c in calls if isinstance(c, str) and any(c == m or c.startswith(m + ".")
                                                                  for m in block.modules)]
        block.keep = kept_out.get(inside[-1]) if inside else None
        block.layers.sort(key=inside.index)
        at = order.index(i)
        block.chained = at > 0 and reads[i][0] == writes.get(order[at - 1])
    return [blocks[i] for i in order]


# ---------------------------------------------------------------------------------- least squares
def fit_kind(layer: nn.Module) -> str:
    """"" when ``layer`` can be refit by least squares, else why not."""
    if isinstance(layer, nn.Linear):
        return ""
    if not isinstance(layer, nn.Conv2d):
        return f"{type(layer).__name__} is neither a Conv2d nor a Linear layer"
    if layer.groups != 1:
        return f"a grouped conv ({layer.groups} groups) mixes no channels across groups"
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return "only explicit zero padding is reproduced by the im2col fit"
    return ""


class Normal:
    """Running sums of the ridge least squares ``t ~ W x + c`` for one layer (float64)."""

    def __init__(self, layer: nn.Module, positions: int, intercept: bool, generator: torch.Generator):
        self.layer = layer
        self.positions = positions
        self.intercept = intercept
        self.generator = generator
        self.n = 0
        self.xx = self.xt = self.sx = self.st = None

    def rows(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches [rows, in * kh * kw], targets [rows, out]) of a batch, at sampled pixel positions."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
        out_h, out_w = t.shape[2:]
        pick = torch.arange(out_h * out_w)
        if 0 < self.positions < len(pick):
            pick = torch.randperm(len(pick), generator=self.generator)[:self.positions].sort().values
        # im2col at the picked output pixels only: F.unfold would build every pixel's patch first.
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (layer.kernel_size, layer.stride, layer.dilation,
                                                  layer.padding)
        rows = (pick // out_w * sh)[:, None, None] + (torch.arange(kh) * dh)[None, :, None]
        cols = (pick % out_w * sw)[:, None, None] + (torch.arange(kw) * dw)[None, None, :]
        patches = F.pad(x, (pw, pw, ph, ph))[:, :, rows.to(x.device), cols.to(x.device)]  # [n, c, P, kh, kw]
        patches = patches.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1] * kh * kw)
        t = t.flatten(2)[:, :, pick.to(t.device)]
        return patches, t.transpose(1, 2).reshape(-1, t.shape[1])

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x, t = self.rows(x.float(), t.float())
        sums = (x.T @ x, x.T @ t, x.sum(0), t.sum(0))
        sums = tuple(s.double() for s in sums)
        if self.xx is None:
            self.xx, self.xt, self.sx, self.st = sums
        else:
            for name, s in zip(("xx", "xt", "sx", "st"), sums):
                setattr(self, name, getattr(self, name) + s)
        self.n += len(x)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight shaped like the layer's, constant [out]); the ridge is relative to the mean variance of
        the inputs, so that it means the same at any activation scale."""
        mx, mt = self.sx / self.n, self.st / self.n
        cxx, cxt = self.xx / self.n, self.xt / self.n
        if self.intercept:
            cxx, cxt = cxx - torch.outer(mx, mx), cxt - torch.outer(mx, mt)
        if ridge > 0:
            lam = ridge * float(cxx.diagonal().mean().clamp_min(1e-30))
            eye = torch.eye(len(cxx), dtype=cxx.dtype, device=cxx.device)
            w = torch.linalg.solve(cxx + lam * eye, cxt)
        else:
            # Minimum-norm solution: collinear or constant inputs (a removed channel that was a copy, a
            # dead one) make cxx singular; directions under 1e-10 of the largest are rounding error.
            w = torch.linalg.pinv(cxx, rtol=1e-10, hermitian=True) @ cxt
        const = mt - mx @ w if self.intercept else torch.zeros_like(mt)
        return w.T.reshape(self.layer.weight.shape), const


# ------------------------------------------------------------------------------------------ driver
@dataclass
class Plan:
    """What ``reconstruct`` works through: the blocks in forward order, each layer's set and BatchNorm."""

    blocks: list[Block]
    set_of: dict[str, str]
    norm_of: dict[str, str]


def plan_blocks(pruned: nn.Module, sets: list[ChannelSet], keep: Keep, example: torch.Tensor,
                status: dict[str, SetStatus]) -> Plan:
    """The blocks holding the consumers to refit: those of every set from the first one (in forward
    order) that loses channels on; a set that cannot be handled gets its reason in ``status``."""
    first = next((i for i, s in enumerate(sets) if len(keep.get(s.name, range(s.size))) < s.size), len(sets))
    kept_out = {p: sorted(keep[s.name]) for s in sets if len(keep.get(s.name, range(s.size))) < s.size
                for p in s.producers}
    blocks: dict[tuple[str, ...], Block] = {}
    set_of, norm_of = {}, {}
    for s in sets[first:]:
        if not s.consumers:
            status[s.name] = SetStatus.skipped(_NO_CONSUMER)
            continue
        reasons = [f"consumer {c}: {why}" for c in s.consumers if (why := fit_kind(pruned.get_submodule(c)))]
        if reasons:
            status[s.name] = SetStatus.skipped(reasons[0])
            continue
        for consumer, norm in zip(s.consumers, s.consumer_norms or ("",) * len(s.consumers)):
            modules = block_of(pruned, consumer)
            block = blocks.setdefault(modules, Block(modules, [], {}))
            block.layers.append(consumer)
            block.out_keep[consumer] = kept_out.get(consumer)
            set_of[consumer], norm_of[consumer] = s.name, norm
    traced = _trace(pruned, list(blocks.values()), example, kept_out)
    if isinstance(traced, str):
        for name in sorted(set(set_of.values())):
            status[name] = SetStatus.skipped(traced)
        return Plan([], {}, {})
    return Plan(traced, set_of, norm_of)


def _map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(b) for b in x.split(batch_size)])


@torch.no_grad()
def fit_layer(original: nn.Module, pruned: nn.Module, block: Block, layer: str, norm: str, x_p: torch.Tensor,
              x_o: torch.Tensor, *, ridge: float, batch_size: int, positions: int, target: str,
              generator: torch.Generator) -> torch.Tensor | None:
    """Refit ``layer`` of ``pruned`` on the block inputs ``x_p`` (pruned network) and ``x_o`` (original);
    for the block's last layer, returns the original block's outputs (computed on the way)."""
    module_p, module_o = pruned.get_submodule(layer), original.get_submodule(layer)
    normal = Normal(module_p, positions, module_p.bias is not None or bool(norm), generator)
    keep = block.out_keep[layer]
    shortcut_p = shortcut_o = None
    if target == "block" and len(block.modules) == 1 and norm:
        shortcut_p = shortcut(pruned, block.modules[0], layer)
        shortcut_o = shortcut(original, block.modules[0], layer)
    if shortcut_p is not None:
        bn = pruned.get_submodule(norm)
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        # what a unit of the stream's gap is worth before the BatchNorm; a zero gain's channel is constant
        inverse = torch.where(gain.abs() > 1e-12, 1 / gain, torch.zeros_like(gain)).view(1, -1, 1, 1)
    last = layer == block.layers[-1]
    outputs = []
    for b_p, b_o in zip(x_p.split(batch_size), x_o.split(batch_size)):
        x_in, _ = _capture(lambda x: block.run(pruned, x), b_p, module_p, output=False)
        t, out = _capture(lambda x: block.run(original, x), b_o, module_o, output=True, stop=not last)
        outputs.append(out)
        t = t if keep is None else t[:, keep]
        if shortcut_p is not None:
            s_o = shortcut_o(b_o)
            t = t + ((s_o if keep is None else s_o[:, keep]) - shortcut_p(b_p)) * inverse
        normal.add(x_in, t)
    weight, const = normal.solve(ridge)
    module_p.weight.copy_(weight.to(module_p.weight))
    if module_p.bias is not None:
        module_p.bias.copy_(const.to(module_p.bias))
    elif norm:
        # The constant shifts the BatchNorm's input: the mean it subtracts moves by as much.
        bn_p, bn_o = pruned.get_submodule(norm), original.get_submodule(norm)
        mean = bn_o.running_mean if keep is None else bn_o.running_mean[keep]
        bn_p.running_mean.copy_(mean - const.to(mean))
    return torch.cat(outputs) if last else None


def _inputs(model: nn.Module, block: Block, loader: DeviceLoader) -> torch.Tensor:
    """The input of ``block`` for every image, running ``model`` only as far as the block."""
    first = model.get_submodule(block.modules[0])
    with torch.no_grad():
        return torch.cat([_capture(model, x, first, output=False)[0] for x, _ in loader])


Tune = Callable[[Block, torch.Tensor, torch.Tensor], str]


def reconstruct(original: nn.Module, pruned: nn.Module, sets: list[ChannelSet], keep: Keep,
                images: ImageSet, *, ridge: float, batch_size: int, positions: int, seed: int,
                target: str = "block", tune: Tune | None = None, device: str | torch.device = "cpu",
                progress: bool = False) -> dict[str, SetStatus]:
    """Refit ``pruned`` in place, block by block in forward order (see the module docstring), and return
    per set what was done ("refit...") or why not. ``seed`` draws the sampled pixel positions.
    ``tune(block, x_p, y_o)``, given the block's inputs in the pruned network and its outputs in the
    original one, runs after each block's least-squares fit and says what it did."""
    device = torch.device(device)
    original.to(device).eval()
    pruned.to(device).eval()
    loader = DeviceLoader(images, batch_size, device=device)
    example = next(iter(loader))[0][:1]
    status: dict[str, SetStatus] = {}
    plan = plan_blocks(pruned, sets, keep, example, status)
    generator = torch.Generator().manual_seed(seed)
    blocks = plan.blocks
    if progress and blocks:
        from tqdm import tqdm

        blocks = tqdm(blocks, desc=f"refit ({len(images)} images)", unit="block")
    x_p = x_o = None
    for block in blocks:
        if not block.chained or x_p is None:
            x_p, x_o = _inputs(pruned, block, loader), _inputs(original, block, loader)
        for layer in block.layers:
            y_o = fit_layer(original, pruned, block, layer, plan.norm_of[layer], x_p, x_o, ridge=ridge,
                            batch_size=batch_size, positions=positions, target=target, generator=generator)
        note = tune(block, x_p, y_o) if tune is not None else ""
        for layer in block.layers:
            status[plan.set_of[layer]] = SetStatus(True, "refit" + (f"; {note}" if note else ""))
        x_p, x_o = _map(lambda x: block.run(pruned, x), x_p, batch_size), y_o
    return {s.name: status[s.name] for s in sets if s.name in status}


@register_recovery
@dataclass(frozen=True)
class Sequential(Recovery):
    """Consumers refit in forward order on the pruned network's own inputs (see the module docstring)."""

    name = "sequential"
    images: int = 2048
    ridge: float = 1e-3
    batch_size: int = 128
    positions: int = 256
    target: str = "block"

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def calibration_images(self) -> int:   # type: ignore[override]
        return self.images

    def sensitivity_fold(self) -> Recovery:
        # With one set pruned alone every layer before its consumers is intact, so refitting the consumers
        # on the pruned prefix's inputs is lstsq's fold of that set (up to the residual gap of target=block,
        # and fitted on the collected moments rather than on the calibration images).
        return LeastSquares(ridge=self.ridge)

    def refit(self, original: nn.Module, pruned: nn.Module, sets: list[ChannelSet], keep: Keep,
              images: ImageSet, *, seed: int, device: str | torch.device = "cpu",
              progress: bool = False) -> dict[str, SetStatus]:
        return reconstruct(original, pruned, sets, keep, images, ridge=self.ridge, batch_size=self.batch_size,
                           positions=self.positions, seed=seed, target=self.target, device=device,
                           progress=progress)


def check_options(r) -> None:
    """One clear line for a bad option shared by the reconstructions."""
    if r.images < 1:
        raise ValueError(f"recover.images={r.images}; accepted: >= 1")
    if r.ridge < 0:
        raise ValueError(f"recover.ridge={r.ridge}; accepted: >= 0 (0: plain least squares)")
    if r.batch_size < 1:
        raise ValueError(f"recover.batch_size={r.batch_size}; accepted: >= 1")
    if r.positions < 0:
        raise ValueError(f"recover.positions={r.positions}; accepted: >= 0 (0: every pixel)")
    if r.target not in TARGETS:
        raise ValueError(f"recover.target={r.target}; accepted: {', '.join(TARGETS)}")
