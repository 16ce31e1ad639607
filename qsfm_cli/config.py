"""Typed schemas of the config groups, registered with Hydra's ConfigStore.

Each key has one owner. Where a stage has a spec dataclass (``PlanSpec``, ``TrainRecipe``, ``Execution``,
``CollectSpec``, ``EvalSpec``, ``ExportSpec``, every registered scorer and recovery, every dataset kind's
spec) its schema is generated from it: same names, same defaults, types as OmegaConf takes them. The YAML
options only set what differs, so a wrong type is Hydra's own error naming the key, before any work.
Scorers, recoveries and dataset kinds have one schema each (``schema/scorer/<name>``,
``schema/recover/<name>``, ``schema/dataset/<kind>``), which their YAML option extends through its defaults
list; a newly registered scorer or recovery gets its schema without edits here. See docs/config.md.
"""
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .collect import CollectSpec
from .data import CifarSpec, DigitsSpec, FakeSpec
from .evaluate import EvalSpec
from .export import ExportSpec
from .imagefolder import ImageFolderSpec
from .loggers import LOGGERS, list_loggers
from .plan import PlanSpec
from .recover import RecoverySpec, get_recovery, list_recoveries
from .scoring import get_scorer, list_scorers
from .train import Execution, TrainRecipe


def schema(name: str, source: type, *, extra: tuple = (), exclude: tuple[str, ...] = (), bases: tuple = ()) -> type:
    """A config dataclass with the fields of dataclass ``source`` (less ``exclude``) after ``extra``
    ``(name, type, default)`` fields: tuples become lists, a union of several types becomes ``Any``."""
    hints = typing.get_type_hints(source)
    fields = [(key, kind, _default(default)) for key, kind, default in extra]
    for f in dataclasses.fields(source):
        if f.name in exclude:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING
        fields.append((f.name, _config_type(hints[f.name]), _default(default)))
    return make_dataclass(name, fields, bases=bases)


def constructor_schema(name: str, cls: type) -> type:
    """A config dataclass of ``cls``'s constructor arguments with their defaults, after its ``_target_``."""
    hints = typing.get_type_hints(cls.__init__)
    fields = [("_target_", str, _default(f"{cls.__module__}.{cls.__qualname__}"))]
    for p in inspect.signature(cls).parameters.values():
        default = MISSING if p.default is p.empty else p.default
        fields.append((p.name, _config_type(hints.get(p.name, Any)), _default(default)))
    return make_dataclass(name, fields)


def _config_type(hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:
            return Any
        return Optional[_config_type(options[0])]
    if origin in (tuple, list):
        item = _config_type(args[0]) if args else Any
        return list[item if item in (int, float, str, bool) else Any]
    if origin is dict or hint is dict:
        return dict[str, Any]
    return hint if hint in (int, float, str, bool) else Any


def _default(value: Any) -> Any:
    if isinstance(value, dict):
        return field(default_factory=lambda: dict(value))
    if isinstance(value, (list, tuple)):
        return field(default_factory=lambda: list(value))
    return field(default=value)


PlanConfig = schema("PlanConfig", PlanSpec)
RecipeConfig = schema("RecipeConfig", TrainRecipe)
ExecutionConfig = schema("ExecutionConfig", Execution)
CollectConfig = schema("CollectConfig", CollectSpec)
EvalConfig = schema("EvalConfig", EvalSpec)
ExportConfig = schema("ExportConfig", ExportSpec)
# The keys every recovery shares; a method's schema adds its own options after them.
RecoverConfig = schema("RecoverConfig", RecoverySpec, exclude=("method",),
                       extra=(("_target_", str, "qsfm_cli.recover.get_recovery"), ("name", str, MISSING)))


@dataclass
class ModelConfig:
    """``model.kwargs``: extra ``create_model`` arguments; ``mean``/``std``: the one place to set the input
    normalization (``None``: the recipe on the weights' card when they were trained on the run's dataset,
    else the dataset's own statistics)."""

    name: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    pretrained: bool = False
    allow_pickle: bool = False
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None


# One schema per dataset kind (``schema/dataset/<kind>``), from the spec its option builds.
DATASET_SPECS = {"cifar": CifarSpec, "digits": DigitsSpec, "fake": FakeSpec, "imagefolder": ImageFolderSpec}


@dataclass
class BaselineConfig:
    train: bool = False                      # train the baseline when no weights are given
    recipe: RecipeConfig = field(default_factory=RecipeConfig)   # finetune/baseline.yaml


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str = "outputs/cache"


@dataclass
class RunConfig:
    """The top level of ``conf/config.yaml``."""

    model: ModelConfig = MISSING
    dataset: Any = MISSING                   # typed by each option's schema/dataset/<kind>
    scorer: Any = MISSING                    # typed by each option's schema/scorer/<name>
    prune: PlanConfig = field(default_factory=PlanConfig)
    recover: Any = MISSING                   # typed by each option's schema/recover/<name>
    finetune: RecipeConfig = field(default_factory=RecipeConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logger: Any = field(default_factory=dict)   # logger name -> its node (conf/logger/*.yaml)
    cache: CacheConfig = field(default_factory=CacheConfig)
    seed: int = 0                            # same config + seed = same channels pruned, same numbers
    device: str = "auto"                     # auto (CUDA when available), cpu, cuda, cuda:N, mps
    progress: bool = True                    # progress bars
    resume: bool = False                     # continue an interrupted fine-tuning in its run dir
    save_model: bool = True                  # write pruned_model.pt
    reference: Optional[str] = None          # a published row shown beside ours (qsfm_cli/papers.py)


def register() -> None:
    """Store every schema in Hydra's ConfigStore (again: a recovery or scorer registered since is added)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, spec in DATASET_SPECS.items():
        target = (("_target_", str, f"{spec.__module__}.{spec.__qualname__}"),)
        cs.store(group="schema/dataset", name=name, node=schema(f"{name}_dataset", spec, extra=target))
    for name in list_scorers():
        extra = (("_target_", str, "qsfm_cli.scoring.get_scorer"), ("name", str, name))
        cs.store(group="schema/scorer", name=name,
                 node=schema(f"{name}_scorer", type(get_scorer(name)), extra=extra))
    for name in list_recoveries():
        method = type(get_recovery(name).method)
        cs.store(group="schema/recover", name=name, node=schema(
            f"{name}_recovery", method, extra=(("name", str, name),), bases=(RecoverConfig,)))
    for name in list_loggers():
        cs.store(group="schema/logger", name=name, node=constructor_schema(f"{name}_logger", LOGGERS.get(name)))
    if not OmegaConf.has_resolver("qsfm.dirname"):
        OmegaConf.register_new_resolver("qsfm.dirname", path_safe)


def path_safe(text: str) -> str:
    """A sweep's ``override_dirname`` as one folder name: a value holding ``/`` must not reach outside."""
    return str(text).replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")


def moved(key: str) -> str | None:
    """For a key that has a new name, the one line saying so; ``None`` for any other key."""
    renamed = {"prune.compensate": f"recover=<{'|'.join(list_recoveries())}|...>",
               "prune.ridge": "recover.ridge", "prune.bn_recalibration": "recover.bn_images",
               "prune.iterative_steps": "recover.iterative_steps", "model.arch": "model.kwargs",
               "dataset.mean": "model.mean", "dataset.std": "model.std"}
    for section in ("finetune", "baseline.recipe"):
        renamed.update({f"{section}.{f.name}": f"execution.{f.name}" for f in dataclasses.fields(Execution)})
    for old, new in renamed.items():
        if key == old or key.startswith(old + "."):
            return f"{old} is now {new}"
    return None
