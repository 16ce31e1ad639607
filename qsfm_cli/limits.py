"""Bounds on the options that size an allocation, checked before any work.

A batch of ``n`` images takes about ``n`` times what one image takes in the model; one image's share is
measured by a forward pass of the (untrained) model at batch 1 (``bytes_per_image``). An option is refused
when its allocation would take more than ``MEMORY_SHARE`` of the memory available when the run starts
(``available_memory``: the device's free memory for CUDA, else the system's available memory), with one
line naming the option, the largest value accepted here and the estimate behind it.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import nn

MEMORY_SHARE = 0.5


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free for a new allocation on ``device``: CUDA's free memory, else Linux's ``MemAvailable``
    (the physical memory elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bytes_per_image(model: nn.Module, example: torch.Tensor, *, training: bool = False) -> int:
    """Bytes one image of ``example``'s shape takes in a forward pass of ``model``: in inference about three
    times the largest layer output (the input of a layer, its output and a residual are alive together);
    in training every layer output is kept for the backward pass, and its gradient besides."""
    sizes: list[int] = []
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()) if isinstance(
        out, torch.Tensor) else None) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    element = example.element_size() if example.is_floating_point() else 4
    inputs = example[:1].numel() * element
    largest = max(sizes, default=0) * element
    return inputs + (2 * sum(sizes) * element if training else 3 * largest)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check_batches(sizes: Mapping[str, int | Sequence[int]], per_image: int, available: int) -> None:
    """Refuse any option in ``sizes`` (config key -> images per batch, or a list of them) whose batch
    would take more than ``MEMORY_SHARE`` of ``available`` bytes at ``per_image`` bytes an image."""
    limit = max(1, int(MEMORY_SHARE * available // max(per_image, 1)))
    for key, value in sizes.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if values and max(values) > limit:
            shown = values if isinstance(value, (list, tuple)) else value
            raise ValueError(f"{key}={shown}; accepted: at most {limit} images here (about "
                             f"{per_image / 2 ** 20:.2f} MiB an image in this model at this input size; "
                             f"{MEMORY_SHARE:.0%} of the {_gib(available)} of memory available)")
