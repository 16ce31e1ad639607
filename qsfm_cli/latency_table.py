"""Latency table: what each channel set's width costs on one runtime, machine, batch and thread count.

For every channel set, the layers whose weights change shape when only that set is pruned (its producer,
its BatchNorm, its consumers; found by pruning it, so no architecture knowledge lives here) are timed alone
at a grid of kept widths (``grid_widths``: the ends and every multiple of a step of 4 or more, hence the
multiples of 8 and 16 that CPU kernels work in), each layer at the input shape it sees in the network.
Layers of the same shape are timed once (a ResNet stage's blocks share one entry). The whole unpruned
network is timed once as well. A pruned network's latency is then predicted as

    base_ms - sum over timed layers of (layer at full width - layer at its widths)     (``additive``)
            + sum over sets inside one block of the block's residual at the set's width

where a layer whose input and output widths belong to two sets (a VGG conv) is at
``full * (ms(w_in) / full) * (ms(w_out) / full)`` (``product``, the default: a conv's cost scales with
both widths), or ``full + (ms(w_in) - full) + (ms(w_out) - full)`` (``additive``). Between grid widths
the timings are interpolated linearly.

A layer timed alone misses what its width does to the layers around it: ONNX Runtime runs a conv in its
blocked channel layout only when the input channels are a multiple of the CPU's block (8 or 16) or fewer,
and a ragged width in the middle of a block adds reorders between layouts on both sides. So a set whose
changed layers all lie in one of the family's blocks (``pruning.blocks``: a ResNet block, an inverted
residual) also has its whole block timed at each grid width; the block's change minus the sum of its
layers' changes is that set's ``residual_ms``, what the layers alone leave out (zero where the layers tell
the whole story, as under a MACs clock).

ONNX Runtime folds a BatchNormalization into the convolution before it, so there BatchNorms are not
timed; the other layers are built as one-node ONNX graphs (any other layer type through
``export.onnx_model``). What the prediction leaves out (activations, additions, pooling, the runtime's
per-call cost) stays at its unpruned cost; ``scripts/bench_speed_target.py`` states the error this leaves
on random plans.
"""
from __future__ import annotations

import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .export import OPSET, onnx_model, onnx_session
from .latency import MIN_REPEATS, RUNTIMES, interleaved_times, onnx_runner, spread, torch_runner, torch_threads
from .pruning import apply_keep, architecture, blocks
from .types import ChannelSet

log = logging.getLogger(__name__)

FORMAT = 2                  # bump when the table's layout or what it measures changes
PREDICTORS = ("product", "additive")
_FUSED_IN_ORT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def grid_widths(size: int) -> list[int]:
    """Kept widths a set is timed at: 1, every multiple of ``step`` below ``size``, and ``size``; ``step``
    is 4 for up to 128 channels, then doubles with the size (at most ~32 widths per set)."""
    step = 4
    while size > 32 * step:
        step *= 2
    return sorted({1, size, *range(step, size, step)})


def machine() -> str:
    """The processor this process runs on, as one text (part of a table's identity)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(model: nn.Module, example: torch.Tensor, sets: Sequence[ChannelSet], *, runtime: str, batch: int,
               threads: int, device: str | torch.device = "cpu", repeats: int = 10) -> dict[str, Any]:
    """What a table depends on: the architecture and its sets, runtime, device, machine, threads, batch,
    input shape, library versions and repeats. Equal conditions share one cached table."""
    device = torch.device("cpu" if runtime == "onnxruntime" else device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    versions = {"torch": torch.__version__}
    if runtime == "onnxruntime":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return {"format": FORMAT, "architecture": architecture(model), "sets": [[s.name, s.size] for s in sets],
            "runtime": runtime, "device": device.type, "machine": where, "threads": threads, "batch": batch,
            "input_shape": list(example.shape[1:]), "versions": versions, "repeats": repeats}


def check_settings(runtime: str, batch: int, threads: int, repeats: int, prefix: str = "") -> None:
    """One line naming the first bad setting (``prefix``: how the caller's config names them)."""
    checks = [(runtime in RUNTIMES, f"{prefix}runtime={runtime}; accepted: {', '.join(RUNTIMES)}"),
              (batch >= 1, f"{prefix}batch={batch}; accepted: a whole number >= 1"),
              (threads >= 1, f"{prefix}threads={threads}; accepted: a whole number >= 1"),
              (repeats >= MIN_REPEATS, f"{prefix}repeats={repeats}; accepted: a whole number >= {MIN_REPEATS}")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def build_table(model: nn.Module, example: torch.Tensor, sets: Sequence[ChannelSet], *, runtime: str, batch: int,
                threads: int, device: str | torch.device = "cpu", repeats: int = 10,
                progress: bool = False) -> dict[str, Any]:
    """Time every set's layers at its grid widths and the whole network (see the module docstring).

    Returns plain data: ``base_ms`` (the unpruned network), ``sizes`` and ``grids`` per set, and per
    timed layer its ``full_ms`` and, per set that changes its shape, ``ms`` at that set's grid widths.
    """
    check_settings(runtime, batch, threads, repeats)
    started = time.perf_counter()
    model = model.eval()
    example = example[:1].cpu()
    device = torch.device("cpu" if runtime == "onnxruntime" else device)
    cpu_model = model.cpu()
    grids = {s.name: grid_widths(s.size) for s in sets}
    block_paths = [b.path for b in blocks(cpu_model)]
    # Per set and width, the layers whose shapes differ from the unpruned network's, with their input shape;
    # per set inside one block, that block at each width, with its input shape.
    variants: dict[str, dict[int, dict[str, tuple[nn.Module, tuple[int, ...]]]]] = {}
    unit_rows: dict[str, tuple[str, list[tuple]]] = {}      # set -> (its block, signature per grid width)
    shapes: dict[tuple, tuple[nn.Module, tuple[int, ...]]] = {}
    for s in sets:
        variants[s.name], row, block = {}, [], None
        for w in grids[s.name][:-1]:
            pruned = apply_keep(cpu_model, {s.name: list(range(w))}, example)
            variants[s.name][w] = _changed_layers(cpu_model, pruned, example)
            block = block or _holding_block(block_paths, set(variants[s.name][w]))
            if block is not None:
                row.append(_block_signature(pruned, block, example))
        if row:
            row.append(_block_signature(cpu_model, block, example))
            for sig, entry in row:
                shapes.setdefault(sig, entry)
            unit_rows[s.name] = block, [sig for sig, _ in row]
    full_layers = _layer_inputs(cpu_model, example)
    skip = _FUSED_IN_ORT if runtime == "onnxruntime" else ()
    axes: dict[str, dict[str, list]] = {}            # layer -> set -> signature per grid width
    for name, by_width in variants.items():
        for w, layers in by_width.items():
            for layer, (module, shape) in layers.items():
                if isinstance(module, skip):
                    continue
                sig = (repr(module), shape)
                shapes.setdefault(sig, (module, shape))
                row = axes.setdefault(layer, {}).setdefault(name, [None] * len(grids[name]))
                row[grids[name].index(w)] = sig
    for layer, by_set in axes.items():
        module, shape = full_layers[layer]
        sig = (repr(module), shape)
        shapes.setdefault(sig, (module, shape))
        for name, row in by_set.items():
            row[-1] = sig
            for i, entry in enumerate(row):   # a width at which this layer keeps its shape: as at full width
                row[i] = entry if entry is not None else sig
    log.info("latency table: timing %d layer and block shapes of %d channel sets on %s (batch %d, %d thread(s), "
             "%d repeats) and the whole network", len(shapes), len(sets), runtime, batch, threads, repeats)
    groups = [row for by_set in axes.values() for row in by_set.values()] + [row for _, row in unit_rows.values()]
    ms = _time_shapes(shapes, groups, runtime=runtime, batch=batch, threads=threads, device=device,
                      repeats=repeats, progress=progress)
    base_ms, base_spread = _time_network(cpu_model, example, runtime=runtime, batch=batch, threads=threads,
                                         device=device, repeats=repeats)
    model.to(device)
    layers = {layer: {"full_ms": ms[(repr(full_layers[layer][0]), full_layers[layer][1])],
                      "ms": {name: [ms[sig] for sig in row] for name, row in by_set.items()}}
              for layer, by_set in axes.items()}
    units = {name: {"block": block, "residual_ms": _residual(name, row, ms, axes)}
             for name, (block, row) in unit_rows.items()}
    seconds = time.perf_counter() - started
    log.info("latency table: built in %.1f s (%d layer and block shapes, unpruned network %.3f ms)", seconds,
             len(shapes), base_ms)
    return {"runtime": runtime, "device": device.type, "batch": batch, "threads": threads,
            "input_shape": list(example.shape[1:]), "base_ms": base_ms, "base_spread": base_spread,
            "sizes": {s.name: s.size for s in sets}, "grids": grids, "layers": layers, "units": units,
            "timed_shapes": len(shapes), "build_s": seconds}


def _holding_block(paths: Sequence[str], layers: set[str]) -> str | None:
    """The innermost block holding every one of ``layers``; None when no block does."""
    holding = [p for p in paths if layers and all(layer.startswith(p + ".") for layer in layers)]
    return max(holding, key=len) if holding else None


def _block_signature(model: nn.Module, block: str, example: torch.Tensor
                     ) -> tuple[tuple, tuple[nn.Module, tuple[int, ...]]]:
    module = model.get_submodule(block)
    [(_, shape)] = _layer_inputs(model, example, [block]).values()
    return ("block", repr(module), shape), (module, shape)


def _residual(name: str, row: Sequence[tuple], ms: Mapping[tuple, float], axes: Mapping[str, Mapping[str, list]]
              ) -> list[float]:
    """Per grid width, the change of the block's time minus the changes of its timed layers."""
    block = [ms[sig] for sig in row]
    layers = [[ms[sig] for sig in by_set[name]] for by_set in axes.values() if name in by_set]
    return [(b - block[-1]) - sum(t[i] - t[-1] for t in layers) for i, b in enumerate(block)]


def _layer_inputs(model: nn.Module, example: torch.Tensor, names: Sequence[str] | None = None
                  ) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Every leaf layer with parameters (or the modules ``names``), with the shape (batch left out) of its
    first input."""
    found: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    handles = []
    for name, module in model.named_modules():
        if (name not in names) if names is not None else next(module.parameters(recurse=False), None) is None:
            continue

        def hook(mod: nn.Module, inputs: tuple, name: str = name) -> None:
            found.setdefault(name, (mod, tuple(inputs[0].shape[1:])))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return found


def _changed_layers(model: nn.Module, pruned: nn.Module, example: torch.Tensor
                    ) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The leaf layers of ``pruned`` whose parameter shapes differ from ``model``'s, with their input shape."""
    before = {name: [tuple(p.shape) for p in m.parameters(recurse=False)] for name, m in model.named_modules()}
    return {name: entry for name, entry in _layer_inputs(pruned, example).items()
            if before.get(name) != [tuple(p.shape) for p in entry[0].parameters(recurse=False)]}


def _time_shapes(shapes: Mapping[tuple, tuple[nn.Module, tuple[int, ...]]], groups: Sequence[Sequence[tuple]],
                 *, runtime: str, batch: int, threads: int, device: torch.device, repeats: int,
                 progress: bool) -> dict[tuple, float]:
    """Median milliseconds of every layer or block shape; the widths of one group (a layer or block across
    one set's widths) are timed in alternation, so that load on the machine slows them alike."""
    ms: dict[tuple, float] = {}
    groups = [list(dict.fromkeys(row)) for row in groups]
    with tqdm(total=len(shapes), desc="latency table", leave=False, disable=not progress,
              dynamic_ncols=True) as bar, torch_threads(threads if runtime == "torch" else None):
        for group in groups:
            todo = [sig for sig in group if sig not in ms]
            if not todo:
                continue
            runs = [_runner(*shapes[sig], runtime=runtime, batch=batch, threads=threads, device=device)
                    for sig in todo]
            times = interleaved_times(runs, repeats, warmup=2, min_warmup_s=0.05)
            for sig, t in zip(todo, times):
                ms[sig] = statistics.median(t)
            bar.update(len(todo))
    return ms


def _time_network(model: nn.Module, example: torch.Tensor, *, runtime: str, batch: int, threads: int,
                  device: torch.device, repeats: int) -> tuple[float, float]:
    """Median milliseconds and spread of the whole network."""
    x = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    if runtime == "onnxruntime":
        run = onnx_runner(onnx_session(onnx_model(model, example).SerializeToString(), threads=threads), x)
    else:
        run = torch_runner(model.to(device), x.to(device))
    with torch_threads(threads if runtime == "torch" else None):
        [times] = interleaved_times([run], repeats)
    return statistics.median(times), spread(times)


def _runner(module: nn.Module, shape: tuple[int, ...], *, runtime: str, batch: int, threads: int,
            device: torch.device) -> Callable[[], object]:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    if runtime == "torch":
        return torch_runner(module.eval().to(device), x.to(device))
    return onnx_runner(onnx_session(_layer_onnx(module, shape), threads=threads), x)


def _layer_onnx(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    """One layer as a serialized ONNX model: a Conv or Gemm node built directly (milliseconds), any other
    layer through the exporter (about a second)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def array(t: torch.Tensor, name: str):
        return numpy_helper.from_array(t.detach().cpu().float().numpy(), name)

    if isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple) and module.padding_mode == "zeros":
        inits = [array(module.weight, "w")] + ([array(module.bias, "b")] if module.bias is not None else [])
        node = helper.make_node("Conv", ["x", *(i.name for i in inits)], ["y"],
                                kernel_shape=list(module.kernel_size), strides=list(module.stride),
                                pads=[*module.padding, *module.padding], dilations=list(module.dilation),
                                group=module.groups)
    elif isinstance(module, nn.Linear) and len(shape) == 1:
        inits = [array(module.weight, "w")] + ([array(module.bias, "b")] if module.bias is not None else [])
        node = helper.make_node("Gemm", ["x", *(i.name for i in inits)], ["y"], transB=1)
    else:
        return onnx_model(module, torch.zeros(1, *shape)).SerializeToString()
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]).SerializeToString()


# ------------------------------------------------------------------------------------------ prediction

def _at(grid: Sequence[int], values: Sequence[float], width: float) -> float:
    return float(np.interp(width, grid, values))


def predict_ms(table: Mapping[str, Any], kept: Mapping[str, int], predictor: str = "product") -> float:
    """Predicted milliseconds of the network with ``kept[name]`` channels in each set (others whole)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor={predictor!r}; accepted: {', '.join(PREDICTORS)}")
    unknown = sorted(set(kept) - set(table["sizes"]))
    if unknown:
        raise ValueError(f"the latency table has no channel set {unknown[0]}; it was built for "
                         f"{', '.join(table['sizes'])}")
    saved = 0.0
    for layer in table["layers"].values():
        full = layer["full_ms"]
        parts = [_at(table["grids"][name], ms, kept.get(name, table["sizes"][name]))
                 for name, ms in layer["ms"].items()]
        if predictor == "product":
            now = full * float(np.prod([p / full for p in parts])) if full > 0 else 0.0
        else:
            now = full + sum(p - full for p in parts)
        saved += full - now
    residual = sum(_at(table["grids"][name], unit["residual_ms"], kept.get(name, table["sizes"][name]))
                   for name, unit in table["units"].items())
    return table["base_ms"] - saved + residual


def predicted_speedup(table: Mapping[str, Any], kept: Mapping[str, int], predictor: str = "product") -> float:
    return table["base_ms"] / max(predict_ms(table, kept, predictor), 1e-9)


def describe(table: Mapping[str, Any]) -> str:
    """One line: what the table was measured on and what it cost."""
    return (f"{table['runtime']} on {table['device']}, batch {table['batch']}, {table['threads']} thread(s), "
            f"input {'x'.join(map(str, table['input_shape']))}: unpruned {table['base_ms']:.3f} ms; "
            f"{table['timed_shapes']} layer and block shapes timed in {table['build_s']:.1f} s")
