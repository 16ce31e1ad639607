"""Content-keyed on-disk cache shared by the jobs of a sweep.

Keys hash everything that determines a value (model weights, data, options); values are written to a
temp file and renamed into place under a file lock, so concurrent jobs neither corrupt an entry nor
compute it twice.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from filelock import FileLock
from torch import nn

from .files import atomic_write

log = logging.getLogger(__name__)
T = TypeVar("T")


def fingerprint(*parts: Any) -> str:
    """A short sha256 of JSON-able parts and tensors (tensors hash by dtype, shape and bytes)."""
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
    return h.hexdigest()[:20]


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(str(key).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture's state (names, shapes, values): equal models share cache entries."""
    return fingerprint(type(model).__name__, dict(model.state_dict()))


class Cache:
    """``get_or_compute(kind, key, compute)`` over ``root/kind/key.pt`` files (torch.save of plain data)."""

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root).expanduser()
        self.enabled = enabled

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def contains(self, kind: str, key: str) -> bool:
        return self.enabled and self.path(kind, key).is_file()

    def put(self, kind: str, key: str, value: Any) -> None:
        """Store ``value`` (computed alongside another entry) unless caching is off."""
        if self.enabled:
            atomic_write(self.path(kind, key), lambda f: torch.save(value, f))

    def get_or_compute(self, kind: str, key: str, compute: Callable[[], T]) -> tuple[T, bool]:
        """Return ``(value, hit)``; ``compute`` runs at most once per key across concurrent jobs."""
        if not self.enabled:
            return compute(), False
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                try:
                    value = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as err:     # truncated, overwritten, from another torch: recompute it
                    log.warning("cache entry %s cannot be read (%s: %s); recomputing it", path,
                                type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                else:
                    log.info("cache hit: %s/%s", kind, key)
                    return value, True
            value = compute()
            atomic_write(path, lambda f: torch.save(value, f))
            log.info("cache miss: %s/%s (stored)", kind, key)
            return value, False


class RunContext:
    """What a run carries from stage to stage beside its data: the cache, where the time went
    (``timings``, seconds per stage) and what the cache served (``cache_status``, hit/miss per entry kind)."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.timings: dict[str, float] = {}
        self.cache_status: dict[str, str] = {}
        self._nested: list[float] = []   # per open stage, the seconds spent in the stages opened inside it

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``, net of any stage timed inside it (time adds up over calls)."""
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    def cached(self, kind: str, key: str, compute: Callable[[], T], status: str | None = None) -> T:
        """``cache.get_or_compute``, noting hit or miss under ``status`` (default: ``kind``)."""
        value, hit = self.cache.get_or_compute(kind, key, compute)
        self.cache_status[status or kind] = "hit" if hit else "miss"
        return value
