"""Reading weights: local files and URLs (checked by torch.hub's sha256 prefix), unpickling tensors and plain
containers only; the registered models' public weights are found by their cards (``models.pretrained_url``)."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or matched to the model."""


def read_state_dict(source: str, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint at a path or URL (``file://`` URLs are local paths); ``{'state_dict': ...}``
    wrappers and ``module.`` prefixes are removed. Only tensors and plain containers are unpickled unless
    ``allow_pickle`` is set."""
    url = urlparse(source)
    if url.scheme == "file":
        # A local file: read in place, not copied into torch.hub's download cache.
        if url.netloc not in ("", "localhost"):
            raise CheckpointError(f"checkpoint {source!r} names host {url.netloc!r}; a file:// URL must be "
                                  "local (file:///absolute/path)")
        path = Path(url2pathname(url.path))
    elif "://" in source:
        path = _download(source)
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {source!r} not found (model.checkpoint must be a file or URL)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        raise CheckpointError(_unreadable(source, path, err)) from None
    return _unwrap(obj, source)


def _download(url: str) -> Path:
    """torch.hub's cached copy of ``url`` (``<hub dir>/checkpoints/<file name>``), fetched once and checked
    against the sha256 prefix its file name carries (``name-<hex>.ext``), as ``torch.hub`` does."""
    name = Path(urlparse(url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        digest = torch.hub.HASH_REGEX.search(name)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), digest.group(1) if digest else None, progress=False)
        except Exception as err:
            raise CheckpointError(
                f"cannot fetch checkpoint {url!r}: {_first_line(err)}; offline, download it elsewhere and pass "
                f"model.checkpoint=PATH") from None
    return cached


def _unreadable(source: str, path: Path, err: BaseException) -> str:
    """Why ``torch.load`` failed, in one line; the unsafe switch is named only for a file that is a
    readable pickle refused for holding objects other than tensors."""
    where = f"cannot read checkpoint {source!r}"
    if path.stat().st_size == 0:
        return f"{where}: the file is empty"
    refused = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if refused:
        return (f"{where}: it pickles {refused.group(1)}, not only tensors; model.allow_pickle=true loads it "
                "(only for a file you trust)")
    if isinstance(err, (ImportError, AttributeError)):  # allow_pickle: a class the file names is missing
        return f"{where}: {_first_line(err)}"
    return f"{where}: not a torch checkpoint (truncated or corrupt?)"


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {source!r} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], against: str, *,
                   optional: Callable[[str], bool] = lambda key: False) -> str:
    """How ``state`` does not fit ``expected`` (missing and unexpected keys, shapes ``vs <against>``), at most
    three of each; empty when it fits. Keys that ``optional`` accepts may be missing."""
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {against} {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    return "; ".join(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                     for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                     if items)


def load_weights(model: nn.Module, source: str, *, allow_pickle: bool = False) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; a mismatch names the first offending keys and shapes."""
    state = read_state_dict(source, allow_pickle=allow_pickle)
    # Checkpoints from PyTorch < 0.4.1 have no BatchNorm step counters; those are bookkeeping only.
    mismatch = state_mismatch(model.state_dict(), state, "model",
                              optional=lambda key: key.endswith("num_batches_tracked"))
    if mismatch:
        raise CheckpointError(f"checkpoint {source!r} does not fit model {type(model).__name__} ({mismatch})")
    model.load_state_dict(state, strict=False)
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
