"""Write stage: every file of a run is written atomically (temp file + rename), so an interrupted or
concurrent job never leaves a half-written result behind."""
from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .record import OK, RunRecord

METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.csv"
PRUNED_FILE = "pruned_model.pt"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, then rename it over ``path``.

    A full disk is ``OSError(ENOSPC, "no space left on <path>")``, whether the OS says so or torch.save's
    stream writer does (a ``RuntimeError`` from ``inline_container.cc`` naming only the archive's member).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600 files; results are for sharing
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or (isinstance(err, RuntimeError) and "inline_container.cc" in str(err)):
            raise OSError(errno.ENOSPC, f"no space left on {path}") from err
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _jsonable(obj: Any) -> Any:
    """JSON has no NaN/inf and no tensors: map them to null and plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def results_row(record: RunRecord) -> dict[str, Any]:
    """The one-row summary of a finished run: its setting columns (``Settings.columns``), then the
    figures (``metrics.json`` holds the full record)."""
    results = record.results
    if record.settings is None or results is None:
        raise ValueError(f"a run with status {record.status!r} has no results row")
    base, final = results.base, results.final
    row = record.settings.columns()
    row.update({
        "base_top1": round(base.top1, 2),
        "pruned_top1": round(final.top1, 2),
        "top1_drop": round(base.top1 - final.top1, 2),
        "top1_before_finetune": round(results.pruned.top1, 2),
        "base_top5": round(base.top5, 2),
        "pruned_top5": round(final.top5, 2),
        "base_MACs_M": round(base.macs / 1e6, 3),
        "pruned_MACs_M": round(final.macs / 1e6, 3),
        "MACs_reduction_%": round(100 * (1 - final.macs / base.macs), 2),
        "base_params_M": round(base.params / 1e6, 4),
        "pruned_params_M": round(final.params / 1e6, 4),
        "params_reduction_%": round(100 * (1 - final.params / base.params), 2),
    })
    for batch, ms in base.latency_ms.items():
        row[f"base_latency_{batch}_ms"] = round(ms, 3)
        row[f"pruned_latency_{batch}_ms"] = round(final.latency_ms[batch], 3)
    for pair in results.latency.values():
        # The eager PyTorch columns carry no prefix: they are the latency the rest of the row describes.
        prefix, batch = ("" if pair["runtime"] == "torch" else "onnx_"), f"b{pair['batch']}"
        if prefix:
            row[f"{prefix}base_latency_{batch}_ms"] = round(pair["base_ms"], 3)
            row[f"{prefix}pruned_latency_{batch}_ms"] = round(pair["pruned_ms"], 3)
        row[f"{prefix}speedup_{batch}"] = round(pair["speedup"], 3)
        row[f"{prefix}speedup_trusted_{batch}"] = pair["trusted"]
        row[f"{prefix}latency_spread_{batch}"] = round(max(pair["base_spread"], pair["pruned_spread"]), 3)
    return row


class FinishedRunError(ValueError):
    """A run directory already holds a finished run: its record is never replaced."""


def read_status(run_dir: Path) -> str | None:
    """The status in ``run_dir/metrics.json``; ``None`` when there is no readable record."""
    try:
        record = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record.get("status") if isinstance(record, dict) else None


def refuse_finished(run_dir: Path) -> None:
    if read_status(run_dir) == OK:
        raise FinishedRunError(f"{run_dir} holds a finished run (its {METRICS_FILE} says status ok), which a rerun "
                               f"would overwrite; choose another run directory (hydra.run.dir=...)")


def write_record(run_dir: Path, record: RunRecord) -> None:
    """``metrics.json``, and for a finished run ``results.csv``; a finished run's record is never replaced
    by one that is not."""
    run_dir = Path(run_dir)
    if record.status != OK and read_status(run_dir) == OK:
        return
    write_json(run_dir / METRICS_FILE, record.to_dict())
    if record.status == OK:
        write_csv(run_dir / RESULTS_FILE, [results_row(record)])


def save_pruned(path: Path, model: nn.Module) -> None:
    """Save weights plus the JSON-able architecture spec (per-layer widths): no pickled modules."""
    from .pruning import architecture

    payload = {"architecture": architecture(model), "state_dict": model.state_dict()}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_pruned(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_pruned`` without the config that produced it."""
    from .pruning import build_model

    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(payload["architecture"], payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
