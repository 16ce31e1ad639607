"""``qsfm-run``: the Hydra edge. Composes the config, turns it into an ``Experiment`` and runs it.

A failing job writes ``metrics.json`` with ``status: failed`` and its error; in a multirun the sweep goes
on, in a single run the command prints the one-line error and exits non-zero.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import outputs, papers

log = logging.getLogger("qsfm_cli")
PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The shipped configs: inside the package in a wheel install, the repo's ``conf/`` in a checkout."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"qsfm_cli configs not found beside {PACKAGE_DIR}; reinstall the package")


def build(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate``, re-raising the target's own error (Hydra wraps it in several lines)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise (err.__cause__ or err) from None


def build_experiment(cfg: DictConfig, run_dir: Path):
    """Translate a composed config into plain arguments for ``pipeline.run_experiment``."""
    from .models import default_normalization
    from .pipeline import EvalSpec, Experiment, resolve_device
    from .plan import PlanSpec

    device = resolve_device(cfg.device)
    scorer = build(cfg.scorer)
    # prune/ also holds the recovery settings, which the Experiment takes below.
    recovery_keys = ("compensate", "ridge", "bn_recalibration", "iterative_steps")
    plan = PlanSpec.from_config({k: v for k, v in OmegaConf.to_container(cfg.prune, resolve=True).items()
                                 if k not in recovery_keys})
    train_set, test_set = build(cfg.dataset)
    mean, std = cfg.model.mean, cfg.model.std
    if mean is None and std is None:  # the recipe on the weights' card, if they were trained on this dataset
        mean, std = default_normalization(cfg.model.name, cfg.dataset.name) or (None, None)
    train_set, test_set = train_set.with_normalization(mean, std), test_set.with_normalization(mean, std)
    prune = cfg.prune
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return Experiment(
        model_name=cfg.model.name,
        model_kwargs={k: v for k, v in resolved["model"]["arch"].items()
                      if k not in ("_target_", "name", "num_classes")},
        train_set=train_set,
        test_set=test_set,
        scorer=scorer,
        plan=plan,
        run_dir=run_dir,
        checkpoint=cfg.model.checkpoint,
        pretrained=cfg.model.pretrained,
        allow_pickle=cfg.model.allow_pickle,
        baseline_recipe=recipe(cfg.baseline.recipe) if cfg.baseline.train else None,
        finetune=recipe(cfg.finetune),
        compensate=prune.compensate,
        ridge=prune.ridge,
        bn_recalibration=prune.bn_recalibration,
        iterative_steps=prune.iterative_steps,
        num_images=cfg.collect.num_images,
        collect_batch_size=cfg.collect.batch_size,
        eval=EvalSpec(cfg.eval.batch_size, tuple(cfg.eval.latency_batches), cfg.eval.latency_repeats),
        seed=cfg.seed,
        device=str(device),
        cache_dir=Path(cfg.cache.dir) if cfg.cache.enabled else None,
        resume=cfg.resume,
        save_model=cfg.save_model,
        progress=cfg.progress,
        record={"dataset": cfg.dataset.name, "config": resolved,
                "reference": papers.reference(cfg.reference).as_dict() if cfg.reference else None},
    )


def recipe(node: DictConfig):
    """A ``TrainRecipe`` from a ``finetune/`` node; an unknown key is one clear error."""
    from .train import TrainRecipe

    return TrainRecipe.from_dict(OmegaConf.to_container(node, resolve=True))


def print_summary(metrics: dict) -> None:
    row = outputs.results_row(metrics)
    width = max(map(len, row))
    print("\n".join(f"{key:<{width}}  {value}" for key, value in row.items()))


def run(cfg: DictConfig) -> dict:
    """Run one job; failures are recorded in its ``metrics.json`` and re-raised."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        from .pipeline import run_experiment

        metrics = run_experiment(build_experiment(cfg, run_dir))
    except BaseException as err:
        outputs.write_json(run_dir / outputs.METRICS_FILE, {
            "status": "failed", "error": f"{type(err).__name__}: {first_line(err)}", "config": container(cfg)})
        raise
    print_summary(metrics)
    return metrics


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def container(cfg: DictConfig) -> dict:
    """The config as plain data, resolved where it resolves (a bad interpolation may be the failure)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """One job. In a multirun a failure is logged and recorded, and the sweep goes on; a single run ends
    with one line on stderr: exit code 2 for a bad value, 1 for any other error (traceback in the log)."""
    single = HydraConfig.get().mode != RunMode.MULTIRUN
    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        if single:
            print(f"qsfm-run: error: {first_line(err)}", file=sys.stderr)
            sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"qsfm-run: interrupted: {err}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        log.exception("job failed")
        if single:
            log_file = Path(HydraConfig.get().runtime.output_dir) / f"{HydraConfig.get().job.name}.log"
            print(f"qsfm-run: error: {type(err).__name__}: {first_line(err)} (traceback in {log_file})",
                  file=sys.stderr)
            sys.exit(1)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
