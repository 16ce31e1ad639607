"""End to end: the installed command on synthetic data with a tiny model, and bad input."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import qsfm_cli
from qsfm_cli.app import build_experiment, config_dir
from qsfm_cli.models import create_model, list_models
from qsfm_cli.outputs import load_pruned
from qsfm_cli.record import RunRecord
from qsfm_cli.recover import list_recoveries
from qsfm_cli.pipeline import run_experiment

from .conftest import qsfm_run


def experiment(tmp_path, *overrides: str, run: str = "run"):
    """The smoke experiment with ``overrides``, run in ``tmp_path/run``, cached in ``tmp_path/cache``."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", f"cache.dir={tmp_path / 'cache'}",
                                           *overrides])
    return build_experiment(cfg, tmp_path / run)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    proc = qsfm_run("experiment=smoke", f"hydra.run.dir={tmp / 'run'}", f"cache.dir={tmp / 'cache'}",
                    "prune.ratio=0.5", cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run", proc.stdout


@pytest.mark.slow
def test_cli_writes_metrics_table_and_model(smoke_run):
    run_dir, stdout = smoke_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = RunRecord.from_dict(metrics)
    assert record.status == "ok" and record.to_dict() == metrics
    results = record.results
    assert results.final.macs < results.base.macs and results.final.params < results.base.params
    assert all(v["kept"] == v["total"] - v["total"] // 2 for v in results.kept_channels.values())
    header = (run_dir / "results.csv").read_text().splitlines()[0].split(",")
    for column in ("model", "dataset", "scorer", "prune.ratio", "recovery", "seed", "base_top1", "pruned_top1",
                   "top1_drop", "base_MACs_M", "pruned_MACs_M", "MACs_reduction_%", "base_params_M",
                   "pruned_params_M", "params_reduction_%", "base_latency_b1_ms", "pruned_latency_b1_ms",
                   "speedup_b1", "finetune.epochs"):
        assert column in header
    assert "MACs_reduction_%" in stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_load_pruned_round_trips_to_identical_outputs(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    model = qsfm_cli.load_pruned(run_dir / "pruned_model.pt")
    x = torch.randn(4, 3, 32, 32)
    qsfm_cli.save_pruned(tmp_path / "again.pt", model)
    again = qsfm_cli.load_pruned(tmp_path / "again.pt")
    assert torch.equal(model(x), again(x))
    assert model.conv1.out_channels == 4 and model.layer1[0].conv1.out_channels == 2


@pytest.mark.slow
def test_same_config_prunes_the_same_channels(tmp_path):
    first = run_experiment(experiment(tmp_path / "a", "scorer=random"))
    second = run_experiment(experiment(tmp_path / "b", "scorer=random"))
    a = qsfm_cli.load_pruned(tmp_path / "a" / "run" / "pruned_model.pt")
    b = qsfm_cli.load_pruned(tmp_path / "b" / "run" / "pruned_model.pt")
    assert first.results.kept_channels == second.results.kept_channels
    assert first.settings == second.settings and first.results.final.top1 == second.results.final.top1
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet57", "model.name=resnet57; accepted:"),
    ("prune.ratio=1.5", "1.5"),
    ("model.checkpoint=missing.pt", "checkpoint 'missing.pt' not found"),
    ("device=cuda:7", "device 'cuda:7'"),
    ("recover.name=foo", f"recover.name=foo; accepted: {', '.join(list_recoveries())}"),
    ("recover.iterative_steps=0", "recover.iterative_steps=0"),
    ("recover.bn_images=1", "recover.bn_images=1"),
    ("recover=lstsq recover.ridge=-1", "recover.ridge=-1.0; accepted: >= 0"),
])
def test_bad_values_fail_with_one_line_naming_them(tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        run_experiment(experiment(tmp_path, *override.split()))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wrong_architecture_checkpoint_is_named(tmp_path):
    torch.save(create_model("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(ValueError, match="does not fit model CifarResNet .*unexpected: layer1.1.conv1.weight"):
        run_experiment(experiment(tmp_path, f"model.checkpoint={tmp_path / 'r20.pt'}"))


@pytest.mark.slow
def test_cli_bad_value_prints_one_line_and_records_the_failure(tmp_path):
    proc = qsfm_run("experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", "model.name=resnet57",
                    cwd=tmp_path)
    assert proc.returncode == 2
    accepted = ", ".join(list_models())
    assert proc.stderr.strip().splitlines() == [
        f"qsfm-run: error: model.name=resnet57; accepted: {accepted}, tv_<torchvision model name>, "
        f"timm_<timm model name>"]
    failed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "resnet57" in failed["error"]


@pytest.mark.slow
def test_iterative_compensated_pruning_reaches_the_one_step_plan(tmp_path):
    one = run_experiment(experiment(tmp_path / "one", "scorer=qsfm", "recover=lstsq"))
    two = run_experiment(experiment(tmp_path / "two", "scorer=qsfm", "recover=lstsq",
                                    "recover.iterative_steps=2", "recover.bn_images=64"))
    assert two.results.kept_channels == one.results.kept_channels
    assert two.results.final.macs == one.results.final.macs
    assert set(two.results.recovery.values()) == {"compensated"}
    assert (one.settings.recovery, two.settings.recovery) == ("lstsq", "lstsq+bn+2steps")
    # The second step re-collected statistics on the partly pruned model.
    assert two.cache["stats@2"] == "miss" and two.timings_s["collect"] > 0
    assert {"baseline", "collect", "score", "plan", "prune", "recover", "evaluate"} <= set(two.timings_s)


@pytest.mark.slow
def test_sensitivity_table_is_cached_with_the_scores(tmp_path):
    overrides = ("prune=sensitivity", "prune.target_macs_reduction=0.3", "prune.sensitivity_grid=[0.25,0.5]",
                 "prune.sensitivity_images=32", "recover=lstsq")
    first = run_experiment(experiment(tmp_path, *overrides, run="a"))
    second = run_experiment(experiment(tmp_path, *overrides, "eval.select_images=48", run="b"))
    assert (first.cache["sensitivity"], second.cache["sensitivity"]) == ("miss", "hit")
    assert first.results.plan["sensitivity_loss"].startswith("KL(original || pruned)")
    assert first.results.select == {} and second.results.select["images"] == 48
    assert 0 < second.results.select["agreement"] <= 100 and second.results.select["kl"] >= 0
    reached = 1 - first.results.final.macs / first.results.base.macs
    assert abs(reached - 0.3) <= 0.005 + 1e-9
    assert first.results.kept_channels == second.results.kept_channels
    # the sensitivity table is measured in the plan stage, not in the prune stage
    assert first.timings_s["plan"] > first.timings_s["prune"]


def test_overlapping_training_splits_are_refused_before_any_work(tmp_path):
    exp = experiment(tmp_path, "prune=sensitivity", "prune.target_macs_reduction=0.3", "prune.sensitivity_images=400",
                     "eval.select_images=64")
    with pytest.raises(ValueError, match=r"^collect.num_images=64, prune.sensitivity_images=400, eval.select_images=64: "
                                         r"528 training images, this training set has 512; the sensitivity"):
        run_experiment(exp)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*baseline*"))


@pytest.mark.slow
def test_refits_measure_the_sensitivity_table_with_lstsq_fold_standing_in(tmp_path):
    """A refit is not run per table entry: sequential and blockwise put lstsq's fold in force there (what a
    refit of one set's consumers amounts to), so they share lstsq's table; no recovery has a table of its own."""
    overrides = ("prune=sensitivity", "prune.target_macs_reduction=0.3", "prune.sensitivity_grid=[0.25,0.5]",
                 "prune.sensitivity_images=32")
    runs = [run_experiment(experiment(tmp_path, *overrides, *extra, run=str(i))) for i, extra in
            enumerate([("recover=lstsq",), ("recover=sequential", "recover.images=32"),
                       ("recover=blockwise", "recover.images=32", "recover.steps=2"), ("recover=none",)])]
    assert [r.cache["sensitivity"] for r in runs] == ["miss", "hit", "hit", "miss"]
    assert [r.results.plan["sensitivity_fold"] for r in runs] == ["lstsq", "lstsq", "lstsq", "none"]
    assert runs[0].results.kept_channels == runs[1].results.kept_channels == runs[2].results.kept_channels


@pytest.mark.slow
def test_sensitivity_allocation_takes_stage_channels_with_scope_all(tmp_path):
    """prune.scope=all puts the residual streams into the table and the allocation (QSFM's profile: params
    can fall faster than MACs), and blockwise tunes the blocks around the streams it cannot refit alone."""
    # Half of every set's channels cannot remove 55% of the MACs without the streams.
    record = run_experiment(experiment(tmp_path, "prune=sensitivity", "prune.scope=all",
                                       "prune.target_macs_reduction=0.55", "prune.sensitivity_grid=[0.25,0.5]",
                                       "prune.sensitivity_images=32", "recover=blockwise", "recover.images=32",
                                       "recover.steps=2"))
    stage = {"conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"}   # stem and stage outputs
    assert stage <= set(record.results.plan["sensitivity"]["layers"]) and stage <= set(record.results.plan["ratios"])
    assert stage <= set(record.results.kept_channels)
    pruned = {n for n in stage if record.results.kept_channels[n]["kept"] < record.results.kept_channels[n]["total"]}
    assert pruned and all(record.results.recovery[n].startswith("skipped: its map is not read") for n in pruned)


@pytest.mark.slow
def test_recovered_model_is_cached_and_served_with_the_same_weights(tmp_path):
    overrides = ("scorer=l1", "recover=sequential", "recover.images=32", "save_model=true")
    first = run_experiment(experiment(tmp_path, *overrides, run="a"))
    second = run_experiment(experiment(tmp_path, *overrides, run="b"))
    other = run_experiment(experiment(tmp_path, *overrides, "recover.ridge=0.01", run="c"))
    assert (first.cache["recovered"], second.cache["recovered"], other.cache["recovered"]) == ("miss", "hit", "miss")
    assert second.results.recovery == first.results.recovery
    assert second.results.pruned.top1 == first.results.pruned.top1
    a, b = (load_pruned(tmp_path / run / "pruned_model.pt").state_dict() for run in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_atomic_writes_leave_readable_files_and_no_temp_files(tmp_path):
    from qsfm_cli.files import write_json

    write_json(tmp_path / "m.json", {"a": float("nan")})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None}
    assert (tmp_path / "m.json").stat().st_mode & 0o044 == 0o044
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.slow
def test_resnet56_on_real_cifar10_matches_the_published_baseline(tmp_path):
    """The README's ResNet-56 command: base top-1 93.39% on the 10,000 test images, 125.49M MACs, 0.853M
    params, and a physically halved set of block-internal channels."""
    from .conftest import CIFAR_ROOT, shared_file

    checkpoint = shared_file("checkpoints", "resnet56-4bfd9763.th")
    shared_file("data", "cifar-10-batches-py", "test_batch")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=resnet56", f"model.checkpoint={checkpoint}", "dataset=cifar10", f"dataset.root={CIFAR_ROOT}",
            "prune.ratio=0.5", "scorer=l1", "finetune.epochs=0", "progress=false", "eval.latency_repeats=3",
            f"cache.dir={tmp_path / 'cache'}"])
    results = run_experiment(build_experiment(cfg, tmp_path / "run")).results
    assert results.base.top1 == pytest.approx(93.39, abs=0.005)
    assert round(results.base.macs / 1e6, 2) == 125.49
    assert round(results.base.params / 1e6, 3) == 0.853
    assert round(100 * (1 - results.final.macs / results.base.macs), 2) == 49.82
    assert 10 < results.final.top1 < results.base.top1


@pytest.mark.slow
def test_compensation_reuses_the_scorers_cached_statistics_and_scores(tmp_path):
    plain = run_experiment(experiment(tmp_path, "scorer=qsfm", run="a"))
    compensated = run_experiment(experiment(tmp_path, "scorer=qsfm", "recover=lstsq", run="b"))
    twin = run_experiment(experiment(tmp_path, "scorer=qsfm", "recover=twin", run="c"))
    assert plain.cache == {"stats": "miss", "orders": "miss", "recovered": "miss"}
    # The moments are collected once (a miss), the SSIM statistics and the scores come from the cache.
    assert compensated.cache["orders"] == "hit" and compensated.cache["stats"] == "miss"
    assert twin.cache == {"stats": "hit", "orders": "hit", "recovered": "miss"}
    assert compensated.results.kept_channels == plain.results.kept_channels


@pytest.mark.slow
def test_distillation_runs_after_the_recovery_and_is_named(tmp_path):
    record = run_experiment(experiment(tmp_path, "recover=sequential", "recover.images=32", "recover.distill_steps=3",
                                       "recover.distill_images=48"))
    assert record.settings.recovery == "sequential+distill3" and record.settings.recover["distill_images"] == 48
    assert record.results.recovery["(network)"].startswith(("distilled: logit error", "distillation: 3 Adam"))
    assert record.timings_s["distill"] > 0


@pytest.mark.slow
def test_recipes_differing_only_after_the_refit_share_it(tmp_path):
    """The refit is cached apart from what follows it: a distillation or BatchNorm variant of a cached run
    refits nothing again, and its weights are those of the same recipe computed cold."""
    base = ("scorer=l1", "recover=sequential", "recover.images=32", "save_model=true")
    plain = run_experiment(experiment(tmp_path, *base, run="a"))
    distilled = run_experiment(experiment(tmp_path, *base, "recover.distill_steps=2", "recover.distill_images=32",
                                          run="b"))
    assert plain.cache["recovered"] == "miss" and "finished" not in plain.cache
    assert (distilled.cache["recovered"], distilled.cache["finished"]) == ("hit", "miss")
    assert distilled.results.recovery["(network)"] and distilled.timings_s["distill"] > 0
    cold = run_experiment(experiment(tmp_path, *base, "recover.distill_steps=2", "recover.distill_images=32",
                                     f"cache.dir={tmp_path / 'cold'}", run="c"))
    b, c = (load_pruned(tmp_path / run / "pruned_model.pt").state_dict() for run in ("b", "c"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert cold.results.pruned.top1 == distilled.results.pruned.top1


@pytest.mark.slow
def test_plan_and_recovery_read_no_training_label(tmp_path):
    """Every training label is -1: a cross-entropy or an index on one anywhere in statistics, sensitivity
    table, allocation, reconstruction or distillation would fail. QSFM's profile settings, tiny."""
    exp = experiment(tmp_path, "prune=sensitivity", "prune.scope=all", "prune.target_macs_reduction=0.4",
                     "prune.target_params_reduction=0.45", "prune.sensitivity_grid=[0.25,0.5,0.75]",
                     "prune.sensitivity_images=32", "recover=blockwise", "recover.images=32", "recover.steps=2",
                     "recover.distill_steps=2", "recover.distill_images=32")
    weights = tmp_path / "tiny.pt"
    torch.save(create_model(exp.model_name, num_classes=exp.train_set.num_classes, **exp.model_kwargs).state_dict(),
               weights)
    exp.checkpoint, exp.baseline_recipe = str(weights), None
    exp.train_set.labels = torch.full_like(exp.train_set.labels, -1)
    record = run_experiment(exp)
    plan = record.results.plan
    assert plan["params_reduction"] >= 0.45 and plan["params_price"] >= 0 and plan["macs_reduction"] >= 0.395
    assert 1 - record.results.final.params / record.results.base.params == pytest.approx(plan["params_reduction"])
    assert record.settings.recovery == "blockwise+distill2"
