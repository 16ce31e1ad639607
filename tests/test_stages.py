"""Each stage takes its own spec: no stage function reads the whole ``Experiment``, the pipeline composes the
stages without dispatching on option names, and a spec's cache key follows its fields."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import tomllib
from dataclasses import field, make_dataclass
from pathlib import Path

import torch

import qsfm_cli
from qsfm_cli import pipeline
from qsfm_cli.cache import Cache, RunContext
from qsfm_cli.data import ImageSet
from qsfm_cli.models import create_model
from qsfm_cli.plan import PlanSpec, plan_stage
from qsfm_cli.pruning import channel_sets
from qsfm_cli.recover import get_recovery
from qsfm_cli.scoring import get_scorer

ROOT = Path(__file__).resolve().parents[1]


def stage_layer() -> list[str]:
    """The modules of the stages' layer in pyproject.toml's import-linter contract (the one with collect)."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layer = next(layer for layer in contract["layers"] if "collect" in layer.replace("|", ":").split(" : "))
    return [name.strip() for name in layer.replace("|", ":").split(":")]


def stage_modules():
    for name in stage_layer():
        module = importlib.import_module(f"qsfm_cli.{name}")
        yield module
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            yield importlib.import_module(f"{module.__name__}.{info.name}")


def test_no_stage_function_takes_the_experiment():
    assert {"collect", "plan", "recover", "train", "evaluate", "deploy", "baseline"} <= set(stage_layer())
    checked = 0
    for module in stage_modules():
        functions = [f for _, f in inspect.getmembers(module, inspect.isfunction) if f.__module__ == module.__name__]
        functions += [f for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__
                      for _, f in inspect.getmembers(cls, inspect.isfunction)]
        for fn in functions:
            for param in inspect.signature(fn).parameters.values():
                assert "Experiment" not in str(param.annotation), f"{module.__name__}.{fn.__qualname__}({param})"
                assert param.name not in ("exp", "experiment"), f"{module.__name__}.{fn.__qualname__}({param})"
            checked += 1
    assert checked > 100      # the walk found the stages' functions


def option_name_tests(source: str) -> list[str]:
    """Comparisons of an option (an attribute: ``exp.plan.allocation``, ``spec.method.name``) or of a
    device name with a string, and string prefix/suffix tests, in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            strings = [o for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)] + [
                e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if strings and any(isinstance(o, ast.Attribute) or (isinstance(o, ast.Name) and o.id == "name")
                               for o in operands):
                found.append(ast.unparse(node))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith"):
            found.append(ast.unparse(node))
    return found


def test_option_name_tests_are_found():
    assert sorted(option_name_tests('if plan.allocation == "sensitivity" or "none" != exp.recovery.label:\n'
                                    '    done.startswith("skipped")\nif name == "auto" or k in ("a", "b"): pass')) == [
        "'none' != exp.recovery.label", "done.startswith('skipped')", "name == 'auto'",
        "plan.allocation == 'sensitivity'"]


def test_the_pipeline_dispatches_on_no_option_name():
    assert option_name_tests(Path(pipeline.__file__).read_text()) == []


def test_the_stage_modules_are_where_the_pipeline_finds_them():
    assert Path(qsfm_cli.__file__).parent.joinpath("pipeline.py").is_file()
    assert {"plan_stage", "collect_stage", "score_stage", "cached_prune_and_recover", "evaluate_stage",
            "export_stage", "finetune", "load_baseline"} <= set(vars(pipeline))


def tiny_setup():
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (24,), generator=g), 10, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    model = create_model("resnet8", stage_widths=(4, 8, 16)).eval()
    example = torch.zeros(1, 3, 16, 16)
    sets = channel_sets(model, example)
    orders = get_scorer("l1").score(model, sets, {})
    return data, model, example, sets, orders


def test_a_new_plan_field_changes_the_sensitivity_cache_key(tmp_path):
    """The sensitivity table's key derives from PlanSpec's fields: a field added to PlanSpec (here by a
    subclass) is part of it, with no edit of the pipeline; a field that only chooses the counts is not."""
    data, model, example, sets, orders = tiny_setup()
    ctx = RunContext(Cache(tmp_path))
    recovery = get_recovery("none").method
    options = dict(target_macs_reduction=0.2, allocation="sensitivity", sensitivity_grid=(0.5,),
                   sensitivity_images=8)

    def status(spec: PlanSpec) -> str:
        plan_stage(model, sets, orders, {}, spec, recovery, ctx, example, orders_key="orders",
                   held_out=lambda: data.held_out(spec.sensitivity_images, 0))
        return ctx.cache_status["sensitivity"]

    Extended = make_dataclass("Extended", [("extra", int, field(default=0))], bases=(PlanSpec,), frozen=True)
    assert status(PlanSpec(**options)) == "miss"
    assert status(PlanSpec(**options)) == "hit"
    assert status(PlanSpec(**{**options, "target_macs_reduction": 0.3})) == "hit"   # one table, every target
    assert status(PlanSpec(**{**options, "sensitivity_images": 9})) == "miss"
    assert status(Extended(**options)) == "miss"
    assert status(Extended(**options, extra=1)) == "miss"
    assert status(Extended(**options, extra=1)) == "hit"


def test_only_a_plan_that_reads_a_sensitivity_table_measures_one(tmp_path):
    data, model, example, sets, orders = tiny_setup()
    ctx = RunContext(Cache(tmp_path))

    def no_data():
        raise AssertionError("the held-out images were asked for")

    for spec in (PlanSpec(ratio=0.5), PlanSpec(target_macs_reduction=0.2)):
        assert not spec.needs_sensitivity
        info = plan_stage(model, sets, orders, {}, spec, get_recovery("none").method, ctx, example,
                          orders_key="orders", held_out=no_data)
        assert set(info["removed"]) == {s.name for s in sets}
    assert ctx.cache_status == {}
    assert PlanSpec(target_macs_reduction=0.2, allocation="sensitivity").needs_sensitivity


def test_a_recovery_declares_the_statistics_of_its_sensitivity_fold():
    sequential = get_recovery("sequential").method
    assert sequential.requests() == set()
    assert sequential.requests_with(False) == set()
    assert sequential.requests_with(True) == sequential.sensitivity_fold().requests() != set()
    lstsq = get_recovery("lstsq").method
    assert lstsq.requests_with(True) == lstsq.requests_with(False) == lstsq.requests()
    assert get_recovery("none").is_raw and not get_recovery("none", bn_images=64).is_raw
    assert not get_recovery("sequential").is_raw
