"""Every option of every config group composes and instantiates."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from torch import nn

from qsfm_cli.app import build, config_dir, reference_of
from qsfm_cli.config import ModelConfig, RunConfig
from qsfm_cli.models import create_model
from qsfm_cli.papers import reference
from qsfm_cli.plan import PlanSpec
from qsfm_cli.recover import RecoverySpec
from qsfm_cli.train import TrainRecipe

CONF = config_dir()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", options("model"))
def test_model_options_instantiate(name):
    cfg = composed(f"model={name}")
    model = create_model(cfg.model.name, num_classes=cfg.dataset.num_classes, **cfg.model.kwargs)
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_instantiate(name, tmp_path):
    cfg = composed(f"dataset={name}")
    if name.startswith("cifar"):
        # Offline and without a copy: the clear error, not a download attempt.
        with pytest.raises(FileNotFoundError, match="dataset.root"):
            build(cfg.dataset, root=str(tmp_path), download=False).load()
        return
    if name in ("imagefolder", "imagenet"):   # folders of real images: tests/test_imagefolder.py builds one
        with pytest.raises(FileNotFoundError, match="dataset.root"):
            build(cfg.dataset, root=str(tmp_path)).load()
        return
    train, test = instantiate(cfg.dataset).load()
    assert train.num_classes == cfg.dataset.num_classes and len(test) > 0


@pytest.mark.parametrize("name", options("scorer"))
def test_scorer_options_instantiate(name):
    scorer = instantiate(composed(f"scorer={name}").scorer)
    assert scorer.name == name
    assert isinstance(scorer.options(), dict)


@pytest.mark.parametrize("name", options("prune"))
def test_prune_options_build_a_plan(name):
    cfg = composed(f"prune={name}")
    plan_keys = {k: v for k, v in OmegaConf.to_container(cfg.prune, resolve=True).items()
                 if k in PlanSpec.__dataclass_fields__}    # prune/ also holds the recovery settings
    assert PlanSpec.from_config(plan_keys) is not None


@pytest.mark.parametrize("name", options("recover"))
def test_recover_options_build_a_recovery(name):
    spec = build(composed(f"recover={name}", "recover.bn_images=64").recover)
    assert isinstance(spec, RecoverySpec) and spec.method.name == name
    assert spec.label == ("bn" if name == "none" else f"{name}+bn")


@pytest.mark.parametrize("name", options("finetune"))
def test_finetune_options_build_a_recipe(name):
    recipe = TrainRecipe.from_dict(OmegaConf.to_container(composed(f"finetune={name}").finetune))
    assert recipe.epochs >= 0


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_resolve(name):
    cfg = composed(f"experiment={name}")
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["model"]["name"] and container["dataset"]["name"]
    if cfg.reference:
        assert reference(cfg.reference).model == cfg.model.name
        assert reference_of(cfg) == reference(cfg.reference).as_dict()   # each shipped experiment is its row's run


@pytest.mark.parametrize("overrides, why", [
    ((), ""),
    (("model=resnet20",), "model=resnet20 (the row's: resnet56)"),
    (("dataset=fake",), "dataset=fake (the row's: cifar10)"),
    (("model=resnet20", "scorer=l1"), "model=resnet20 (the row's: resnet56), scorer=l1 (the row's: qsfm)"),
])
def test_reference_row_is_attached_only_to_the_run_it_describes(overrides, why, caplog):
    row = reference_of(composed("experiment=qsfm_resnet56_posttrain", *overrides))
    if why:
        assert row is None and f"reference qsfm_resnet56 not attached: {why}" in caplog.text
    else:
        assert row == reference("qsfm_resnet56").as_dict() and "not attached" not in caplog.text


def test_defaults_run_the_product_command():
    cfg = composed("prune.ratio=0.3")
    assert (cfg.model.name, cfg.scorer.name, cfg.prune.ratio, cfg.recover.name, cfg.finetune.epochs) == \
        ("resnet56", "qsfm", 0.3, "none", 0)


def test_schemas_type_every_group_and_keep_the_python_defaults():
    cfg = composed("recover=lstsq", "scorer=simscore")
    # the defaults come from the specs, not from a second copy in the YAML
    assert cfg.prune.sensitivity_grid == list(PlanSpec().sensitivity_grid)
    assert (cfg.recover.ridge, cfg.scorer.k1, cfg.execution.amp) == (1e-3, 0.01, "auto")
    for override in ("prune.ratio=abc", "recover.ridge=abc", "scorer.window=abc", "finetune.lr=abc",
                     "execution.channels_last=maybe", "collect.num_images=abc", "dataset.num_classes=abc"):
        with pytest.raises(ConfigCompositionException) as err:
            composed("recover=lstsq", "scorer=simscore", override)
        assert isinstance(err.value.__cause__, ValidationError), override


def test_unknown_group_option_lists_hydras_choices():
    with pytest.raises(MissingConfigException) as err:
        composed("model=resnet57")
    assert "resnet56" in str(err.value) and "vgg16_bn" in str(err.value)


def test_every_group_has_options():
    for group in ("model", "dataset", "scorer", "prune", "recover", "finetune", "experiment"):
        assert options(group), group
    assert Path(CONF, "config.yaml").is_file()


def test_unknown_reference_key_names_the_published_rows():
    with pytest.raises(ValueError, match="^reference=chip_r56; accepted: qsfm_resnet56, "):
        reference("chip_r56")


def leaves(node: dict, prefix: str = "") -> dict:
    """``{dotted key: value}`` of a plain mapping's leaves (lists are leaves)."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def inherited(group: str, option: str, parents: list) -> dict:
    """What the option would hold without its own keys: its parent option, its schema, or the run schema's."""
    if parents and not str(parents[0]).startswith("/schema/"):
        return OmegaConf.to_container(composed(f"{group}={parents[0]}")[group], resolve=False)
    if parents:
        path, _, package = str(parents[0]).removeprefix("/").partition("@")
        node = OmegaConf.to_container(OmegaConf.create(ConfigStore.instance().load(f"{path}.yaml").node))
        return node if package in ("", "_here_") else {package: node}
    if group == "model":
        return OmegaConf.to_container(OmegaConf.structured(ModelConfig))
    return OmegaConf.to_container(OmegaConf.structured(RunConfig)[group])


# Published recipes are written out whole: a paper's protocol must not move when a schema default does.
PINNED = {("finetune", "baseline"), ("finetune", "chip"), ("finetune", "hrank")}


@pytest.mark.parametrize("group", ["dataset", "scorer", "prune", "recover", "finetune", "model", "logger"])
def test_options_set_only_what_differs_from_what_they_extend(group):
    for option in (o for o in options(group) if (group, o) not in PINNED):
        raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
        parents = [d for d in raw.pop("defaults", []) if d != "_self_"]
        base = leaves(inherited(group, option, parents))
        restated = [k for k, v in leaves(raw).items() if k in base and base[k] == v]
        assert not restated, f"conf/{group}/{option}.yaml restates {restated}"


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_set_only_what_differs_from_their_groups(name):
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)
    choices = [f"{k.removeprefix('override /')}={v}" for d in raw.pop("defaults", []) for k, v in d.items()]
    base = leaves(OmegaConf.to_container(composed(*choices), resolve=False))
    restated = [k for k, v in leaves(raw).items() if k in base and base[k] == v]
    assert not restated, f"conf/experiment/{name}.yaml restates {restated}"
