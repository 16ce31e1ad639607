"""Latency of a model and its pruned copy, measured as a pair, in eager PyTorch or ONNX Runtime (CPU).

Timed one after the other, whatever else runs on the machine lands on one model only: on a busy CPU a
1.3x speed-up came out as 430x or 0.005x. Here both models are warmed up, then timed in alternation,
round after round (A B, B A, ...), so that load slows both alike; and each model's spread (interquartile
range over median of its timings) says whether the machine was quiet enough for the ratio to be a result.
A pair whose spread exceeds ``max_spread`` (default ``MAX_SPREAD`` = 0.2) is marked untrusted: its
speed-up is reported, marked, but not as a result.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .export import onnx_model, onnx_session

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
MAX_SPREAD = 0.2
MIN_REPEATS = 3          # the fewest timings whose quartiles still say something about the spread


@dataclass(frozen=True)
class PairLatency:
    """Median milliseconds per forward pass of the base and the pruned model at one batch size."""

    runtime: str
    batch: int
    threads: int | None          # intra-op threads (None: the runtime's default)
    base_ms: float
    pruned_ms: float
    base_spread: float           # IQR / median of the base model's timings
    pruned_spread: float
    speedup: float               # base_ms / pruned_ms
    trusted: bool                # both spreads within max_spread
    max_spread: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def speedup_text(self) -> str:
        return speedup_text(self.speedup, self.trusted)


def speedup_text(speedup: float, trusted: bool) -> str:
    """``1.29`` for a trusted speed-up, ``(1.29)?`` for an untrusted one."""
    return f"{speedup:.2f}" if trusted else f"({speedup:.2f})?"


def spread(times: Sequence[float]) -> float:
    """Interquartile range over median: 0 for identical timings, ~0.05 on a quiet machine."""
    if len(times) < 2:
        raise ValueError(f"a spread needs at least 2 timings; got {len(times)}")
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / median if median > 0 else float("inf")


def summarize_pair(base_times: Sequence[float], pruned_times: Sequence[float], *, runtime: str, batch: int,
                   threads: int | None = None, max_spread: float = MAX_SPREAD) -> PairLatency:
    """The pair's medians, spreads, speed-up and whether the speed-up can be trusted."""
    base_ms, pruned_ms = statistics.median(base_times), statistics.median(pruned_times)
    spreads = spread(base_times), spread(pruned_times)
    return PairLatency(runtime=runtime, batch=batch, threads=threads, base_ms=base_ms, pruned_ms=pruned_ms,
                       base_spread=spreads[0], pruned_spread=spreads[1], speedup=base_ms / pruned_ms,
                       trusted=max(spreads) <= max_spread, max_spread=max_spread,
                       repeats=min(len(base_times), len(pruned_times)))


def interleaved_times(runs: Sequence[Callable[[], object]], repeats: int, *, warmup: int = 3,
                      min_warmup_s: float = 0.5,
                      clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Milliseconds of ``repeats`` calls of each of ``runs``, called in alternation.

    Warm-up rounds come first, at least ``warmup`` of them and ``min_warmup_s`` seconds: the first passes
    at a new input shape set up kernels and thread pools. Every other round runs in reverse order, so
    that no run always follows the same one.
    """
    warm_start = clock()
    for i in itertools.count():
        if i >= warmup and clock() - warm_start >= min_warmup_s:
            break
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for r in range(repeats):
        order = list(enumerate(runs))
        for i, run in (order if r % 2 == 0 else order[::-1]):
            start = clock()
            run()
            times[i].append((clock() - start) * 1e3)
    return times


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (None: left as it is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One eager forward pass of ``model`` on ``x``; CUDA work is waited for, so it is timed."""
    sync = x.device.type == "cuda"

    @torch.no_grad()
    def run() -> None:
        model(x)
        if sync:
            torch.cuda.synchronize(x.device)

    return run


def onnx_runner(session, x: torch.Tensor) -> Callable[[], None]:
    """One forward pass of an ONNX Runtime session on ``x`` (copied to the CPU once, beforehand)."""
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: session.run(None, feed)


def _check_settings(runtime: str, batches: Sequence[int], repeats: int, warmup: int, threads: int | None,
                    max_spread: float) -> None:
    checks = [
        (runtime in RUNTIMES, f"latency runtime {runtime!r}; accepted: {', '.join(RUNTIMES)}"),
        (len(batches) > 0 and all(isinstance(b, int) and b >= 1 for b in batches),
         f"latency batches must be integers >= 1; got {list(batches)}"),
        (repeats >= MIN_REPEATS, f"latency repeats must be >= {MIN_REPEATS}; got {repeats}"),
        (warmup >= 0, f"latency warm-up must be >= 0; got {warmup}"),
        (threads is None or threads >= 1, f"latency threads must be >= 1 or None; got {threads}"),
        (max_spread > 0, f"max_spread must be > 0; got {max_spread}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def measure_pair(base: nn.Module, pruned: nn.Module, batches: Sequence[int] = (1, 64), *,
                 runtime: str = "torch", device: str | torch.device = "cpu",
                 input_hw: tuple[int, int] = (32, 32), repeats: int = 20, warmup: int = 3,
                 min_warmup_s: float = 0.5, threads: int | None = None, max_spread: float = MAX_SPREAD,
                 seed: int = 0) -> list[PairLatency]:
    """Latency of ``base`` and ``pruned`` at each batch size, timed in alternation on random inputs.

    ``runtime="torch"`` times eager PyTorch in eval mode on ``device``; ``"onnxruntime"`` exports both
    models to ONNX and times ONNX Runtime's CPU provider, whatever ``device`` is. ``threads`` sets the
    runtime's intra-op threads for the measurement (None: its default).
    """
    _check_settings(runtime, batches, repeats, warmup, threads, max_spread)
    models = [base.eval(), pruned.eval()]
    if runtime == "onnxruntime":
        example = torch.zeros(1, 3, *input_hw)
        sessions = [onnx_session(onnx_model(m, example).SerializeToString(), threads=threads) for m in models]
    results = []
    with torch_threads(threads if runtime == "torch" else None):
        for batch in batches:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(batch, 3, *input_hw, generator=g)
            if runtime == "torch":
                x = x.to(device)
                runs = [torch_runner(m, x) for m in models]
            else:
                runs = [onnx_runner(s, x) for s in sessions]
            base_times, pruned_times = interleaved_times(runs, repeats, warmup=warmup, min_warmup_s=min_warmup_s)
            results.append(summarize_pair(base_times, pruned_times, runtime=runtime, batch=batch,
                                          threads=threads, max_spread=max_spread))
            log.info("latency (%s) batch %d: base %.3f ms, pruned %.3f ms", runtime, batch, results[-1].base_ms,
                     results[-1].pruned_ms)
    return results


def onnx_pair_latency(first: str | Path, second: str | Path, batch: int, *, input_shape: Sequence[int],
                      threads: int | None = 1, repeats: int = 20):
    """Two ONNX files timed in alternation in ONNX Runtime (``latency.summarize_pair``: ``base_ms`` is
    ``first``'s, ``speedup`` is first over second)."""
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    runs = [onnx_runner(onnx_session(Path(p), threads=threads), x) for p in (first, second)]
    times = interleaved_times(runs, repeats)
    return summarize_pair(*times, runtime="onnxruntime", batch=batch, threads=threads)


def model_latency(model: nn.Module, batch: int, *, device: str | torch.device = "cpu",
                  input_hw: tuple[int, int] = (32, 32), repeats: int = 20, warmup: int = 3,
                  min_warmup_s: float = 0.5) -> float:
    """Median milliseconds per eager forward pass of one model alone (compare two with ``measure_pair``)."""
    _check_settings("torch", [batch], repeats, warmup, None, MAX_SPREAD)
    model.eval()
    x = torch.randn(batch, 3, *input_hw, generator=torch.Generator().manual_seed(0)).to(device)
    [times] = interleaved_times([torch_runner(model, x)], repeats, warmup=warmup, min_warmup_s=min_warmup_s)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ reporting

def format_pairs(pairs: Sequence[PairLatency]) -> str:
    """A text table of the pairs, untrusted speed-ups marked, with the legend below."""
    lines = [f"{'runtime':<12} {'batch':>5} {'threads':>7} {'base ms':>9} {'spread':>6} {'pruned ms':>9} "
             f"{'spread':>6} {'speed-up':>9}"]
    for p in pairs:
        lines.append(f"{p.runtime:<12} {p.batch:>5} {p.threads or 'default':>7} {p.base_ms:>9.3f} "
                     f"{p.base_spread:>6.2f} {p.pruned_ms:>9.3f} {p.pruned_spread:>6.2f} {p.speedup_text():>9}")
    if not all(p.trusted for p in pairs):
        limits = sorted({p.max_spread for p in pairs})
        lines.append(f"(x)? = untrusted: a spread (IQR / median) above {', '.join(f'{s:g}' for s in limits)}; "
                     "rerun on a quieter machine")
    return "\n".join(lines)
