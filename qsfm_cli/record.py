"""The record of one run: what identifies it (``Settings``) kept apart from what it measured (``Results``).

``metrics.json`` is ``RunRecord.to_dict()``; the ``results.csv`` row (``outputs.results_row``), the report's
grouping and the plot's series are all derived from the same ``Settings``, so an option added to a stage's
spec reaches every one of them without further edits. Two runs are the same setting exactly when their
settings are equal except for the seed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .plan import PlanSpec
    from .recover import RecoverySpec
    from .scoring import Scorer
    from .train import TrainRecipe

RUNNING, OK, FAILED = "running", "ok", "failed"
STATUSES = (RUNNING, OK, FAILED)

# A section's own name is its column ("scorer", not "scorer.name"); the protocol is read as a column of its
# own because every table splits on it.
_RENAMED = {"model.name": "model", "dataset.name": "dataset", "scorer.name": "scorer", "prune.protocol": "protocol",
            "recover.name": "recover"}
# Column order of a results row: the headline settings first, the seed last.
_ORDER = ("model", "dataset", "scorer", "scorer.", "protocol", "prune.", "recovery", "recover", "recover.",
          "finetune.", "collect.", "model.", "dataset.", "seed")
# The columns that say how much is pruned: the points along one series of a plot.
AMOUNTS = ("prune.ratio", "prune.rates", "prune.threshold", "prune.target_macs_reduction", "prune.target_speedup")


@dataclass
class Metrics:
    """One model's figures. ``macs`` counts conv and linear multiply-accumulates (FLOPs / 2)."""

    top1: float
    top5: float
    macs: int
    params: int
    latency_ms: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Settings:
    """Everything that identifies a run, one section per config group (values JSON-able).

    ``recovery`` is the recovery's short label ("lstsq+bn"), shown beside every result so that a
    recovered result is never read as the criterion's raw output.
    """

    model: dict[str, Any]
    dataset: dict[str, Any]
    scorer: dict[str, Any]
    prune: dict[str, Any]
    recover: dict[str, Any]
    recovery: str
    finetune: dict[str, Any]
    collect: dict[str, Any]
    seed: int

    @classmethod
    def of(cls, *, model: Mapping[str, Any], dataset: Mapping[str, Any], scorer: "Scorer", plan: "PlanSpec",
           recovery: "RecoverySpec", finetune: "TrainRecipe", num_images: int, seed: int) -> "Settings":
        """The settings of a run from its stages' specs; ``model``/``dataset`` hold a ``name`` and whatever
        else identifies them (weights, constructor arguments, data options)."""
        options = scorer.options()
        # scorer=random follows ${seed}: a scorer seed equal to the run's is the run's seed, not a setting.
        if options.get("seed") == seed:
            options.pop("seed")
        prune = {**asdict(plan), **plan.describe()}
        if plan.allocation != "sensitivity":
            for key in ("sensitivity_grid", "sensitivity_images"):
                prune.pop(key)
        if plan.target_speedup is None:
            for key in ("latency_runtime", "latency_batch", "latency_threads", "latency_repeats",
                        "speedup_tolerance"):
                prune.pop(key)
        method = recovery.method
        recover = {"name": method.name, **method.options(), "bn_images": recovery.bn_images,
                   "iterative_steps": recovery.iterative_steps}
        if recovery.bn_images:
            recover["bn_batch_size"] = recovery.bn_batch_size
        recover.update(recovery.distillation())
        # Without fine-tuning the recipe's other fields change nothing.
        tuned = finetune.to_dict() if finetune.epochs else {"epochs": 0}
        return cls(model=dict(model), dataset=dict(dataset), scorer={"name": scorer.name, **options},
                   prune=prune, recover=recover, recovery=recovery.label, finetune=tuned,
                   collect={"num_images": num_images}, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Settings":
        return cls(**d)

    def columns(self) -> dict[str, Any]:
        """Flat, named by config key (``prune.scope``), scalars only (lists as JSON text), unset values
        left out: the setting columns of a results row."""
        flat = {_RENAMED.get(key, key): value for key, value in _flatten(self.to_dict()).items()
                if value is not None}
        return dict(sorted(flat.items(), key=lambda item: _rank(item[0])))

    def identity(self, exclude: tuple[str, ...] = ()) -> str:
        """One text for every run of the same setting: the columns except the seed and ``exclude``."""
        kept = {k: v for k, v in self.columns().items() if k != "seed" and k not in exclude}
        return json.dumps(kept, sort_keys=True)


def is_setting_column(column: str) -> bool:
    """Whether a results-row column is a setting (named by its config key) rather than a figure."""
    return "." in column or column in (*_RENAMED.values(), "recovery", "seed")


def config_columns(config: Mapping[str, Any]) -> dict[str, Any]:
    """Setting columns read from a composed config: for a run that failed before its settings were known."""
    sections = ("scorer.", "prune.", "recover.", "finetune.epochs", "collect.num_images")
    flat = _flatten(_plain(dict(config)))
    picked = {key: value for key, value in flat.items()
              if key in ("model.name", "dataset.name", "seed") or key.startswith(sections)}
    return {_RENAMED.get(key, key): value for key, value in picked.items()
            if value is not None and not key.endswith("_target_")}


@dataclass
class Results:
    """What a finished run measured. ``pruned``: right after pruning and recovery; ``final``: after
    fine-tuning (``pruned`` without it). ``recovery``: per channel set, what the recovery did.
    ``latency``: per ``<runtime>/b<batch>``, base and pruned timed together (``PairLatency.to_dict()``):
    medians, spreads, speed-up and whether it can be trusted. ``select``: the final model against the
    unpruned one on held-out training images (``evaluate.fidelity``; empty unless ``eval.select_images``),
    the figures recipes are chosen by; the test set gives the reported figure only. ``speed``: a speed-up
    target's predicted and measured speed-up side by side (``Strategy.verify``), on the runtime, batch and
    threads it names."""

    base: Metrics
    pruned: Metrics
    final: Metrics
    kept_channels: dict[str, dict[str, int]]
    plan: dict[str, Any]
    recovery: dict[str, str]
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    select: dict[str, float] = field(default_factory=dict)
    speed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "pruned": self.pruned.to_dict(), "final": self.final.to_dict(),
                "kept_channels": self.kept_channels, "plan": self.plan, "recovery": self.recovery,
                "latency": self.latency, "select": self.select, "speed": self.speed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Results":
        return cls(base=Metrics(**d["base"]), pruned=Metrics(**d["pruned"]), final=Metrics(**d["final"]),
                   kept_channels=d["kept_channels"], plan=d["plan"], recovery=d["recovery"],
                   latency=d.get("latency") or {}, select=d.get("select") or {}, speed=d.get("speed"))


@dataclass
class RunRecord:
    """One run as ``metrics.json`` holds it. ``status`` is ``running`` from the start of the run (a killed
    run stays so), then ``ok`` or ``failed`` with its ``error``; ``settings`` is ``None`` only for a run that
    failed before they were known (its ``config`` then says what was asked). ``export``: the ONNX export
    and its ONNX Runtime check (``export.check_onnx``, or the error that stopped it), when asked for."""

    settings: Settings | None
    status: str = RUNNING
    error: str | None = None
    results: Results | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    cache: dict[str, str] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    export: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error,
                "settings": self.settings.to_dict() if self.settings else None,
                "results": self.results.to_dict() if self.results else None,
                "timings_s": self.timings_s, "cache": self.cache, "reference": self.reference,
                "config": self.config, "export": self.export}

    @classmethod
    def from_dict(cls, d: Any) -> "RunRecord":
        """The record of a ``metrics.json``; ``ValueError`` naming what is wrong with one that is not."""
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object but {type(d).__name__}")
        if d.get("status") not in STATUSES:
            raise ValueError(f"status {d.get('status')!r}; accepted: {', '.join(STATUSES)}")
        try:
            settings = Settings.from_dict(d["settings"]) if d.get("settings") else None
            results = Results.from_dict(d["results"]) if d.get("results") else None
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or bad field {exc}") from None
        if d["status"] == OK and (settings is None or results is None):
            raise ValueError("status ok without settings and results")
        return cls(settings=settings, status=d["status"], error=d.get("error"), results=results,
                   timings_s=d.get("timings_s") or {}, cache=d.get("cache") or {}, reference=d.get("reference"),
                   config=d.get("config"), export=d.get("export"))


def error_text(err: BaseException) -> str:
    """``Type: first line of the message``: how a failure is recorded and printed."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def _plain(obj: Any) -> Any:
    """Tuples as lists, so that a record reads back equal to what was written."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _rank(column: str) -> int:
    for i, key in enumerate(_ORDER):
        if column == key or (key.endswith(".") and column.startswith(key)):
            return i
    return len(_ORDER)
