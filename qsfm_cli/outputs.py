"""Write stage: a run's record files (``metrics.json``, ``results.csv``) and its pruned model, each written
atomically (``qsfm_cli.files``)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_write, write_csv, write_json
from .pruning import architecture, build_model
from .record import OK, RunRecord

METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.csv"
PRUNED_FILE = "pruned_model.pt"


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
        # The eager PyTorch columns carry no prefix: they are the latency the rest of the row describes; any
        # other runtime's are prefixed with its config name (eval.runtimes).
        prefix, batch = ("" if pair["runtime"] == "torch" else f"{pair['runtime']}_"), f"b{pair['batch']}"
        if prefix:
            row[f"{prefix}base_latency_{batch}_ms"] = round(pair["base_ms"], 3)
            row[f"{prefix}pruned_latency_{batch}_ms"] = round(pair["pruned_ms"], 3)
        row[f"{prefix}speedup_{batch}"] = round(pair["speedup"], 3)
        row[f"{prefix}speedup_trusted_{batch}"] = pair["trusted"]
        row[f"{prefix}latency_spread_{batch}"] = round(max(pair["base_spread"], pair["pruned_spread"]), 3)
    if results.speed is not None:
        # A speed-up target's runtime, batch and threads are the prune.latency_* setting columns.
        speed = results.speed
        row.update(predicted_speedup=round(speed["predicted_speedup"], 3),
                   measured_speedup=round(speed["measured_speedup"], 3), measured_speedup_trusted=speed["trusted"],
                   speedup_target_met=speed["met"])
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
    payload = {"architecture": architecture(model), "state_dict": model.state_dict()}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_pruned(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_pruned`` without the config that produced it."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:     # torch's own text would advise unpickling code
        why = "it pickles objects other than tensors; refused, nothing run" \
            if isinstance(err, pickle.UnpicklingError) else "truncated or corrupt"
        raise ValueError(f"cannot read {path}: not a pruned model saved by qsfm-run ({why})") from None
    if not isinstance(payload, dict) or not {"architecture", "state_dict"} <= payload.keys():
        raise ValueError(f"cannot read {path}: not a pruned model saved by qsfm-run (no architecture and "
                         f"state_dict)")
    model = build_model(payload["architecture"], payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
