"""Protocols -> Keep: ratio, rate strings, threshold, MACs target (uniform / threshold / sensitivity),
with min_channels and round_to settled the same way by every protocol."""
import math
import subprocess
import sys
import tracemalloc

import pytest
import torch
from torch import nn

from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.models import create_model
from qsfm_cli.plan import (ALLOCATIONS, MAX_RATES, PROTOCOLS, TOLERANCE, MacsMeter, PlanSpec, format_sensitivity,
                           keep_from_counts, make_keep, measure_sensitivity, parse_rates, removed_count, settle)
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.scoring import get_scorer, threshold_scorers
from qsfm_cli.types import Order

from .conftest import macs_clock

X = torch.zeros(1, 3, 32, 32)


def identity_orders(sets, values=None):
    return {s.name: Order(removal=list(range(s.size)), values=values(s) if values else None) for s in sets}


def shuffled_orders(sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: Order(removal=torch.randperm(s.size, generator=g).tolist()) for s in sets}


# ---------------------------------------------------------------------------------------- rate strings
def test_rate_strings_expand():
    assert parse_rates("[0.]+[0.15]*2+[0.4]*27") == [0.0] + [0.15] * 2 + [0.4] * 27
    hrank = parse_rates("[0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]")
    assert len(hrank) == 55 and hrank[36:38] == [0.0, 0.0]
    assert parse_rates(" [0.1, .2]*2 + 0.3 ") == [0.1, 0.2, 0.1, 0.2, 0.3]
    assert parse_rates([0.5, 0.25]) == [0.5, 0.25]


@pytest.mark.parametrize("text, message", [
    ("[0.1]*2.5", "expected a whole repeat count after '*' at '2.5'"),
    ("[0.1,0.2", "expected ',' or ']' at the end"),
    ("[0.1]+", "expected a number at the end"),
    ("__import__('os')", "cannot read \"__import__('os')\""),
    ("[0.1][0.2]", "expected '+' or the end at '['"),
])
def test_bad_rate_strings_name_the_problem(text, message):
    with pytest.raises(ValueError) as err:
        parse_rates(text)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["[0.1]*100000000", f"[0.1, 0.2]*{MAX_RATES // 2 + 1}",
                                  f"[0.1]*{MAX_RATES}+0.2", "[0.1]*" + "9" * 5000])
def test_a_huge_rate_expansion_is_refused_before_it_is_built(text):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as err:
            parse_rates(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value).endswith(f"expands to more than {MAX_RATES} entries; accepted: at most {MAX_RATES}")
    assert peak < 1_000_000     # bytes: the list is never built
    with pytest.raises(ValueError, match=f"has {MAX_RATES + 1} entries; at most {MAX_RATES} are accepted"):
        parse_rates([0.1] * (MAX_RATES + 1))
    assert len(parse_rates(f"[0.1]*{MAX_RATES - 1}+0.2")) == MAX_RATES


# ------------------------------------------------------------------------------------------------ spec
@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.5}, "prune.ratio=1.5; accepted: a number in [0, 1)"),
    ({"ratio": 1.0}, "prune.ratio=1.0; accepted: a number in [0, 1)"),
    ({"rates": "[0.5]*2", "threshold": 0.9}, "prune.rates and prune.threshold are both set"),
    ({"rate_layout": "chip"}, "prune.rate_layout=chip needs prune.rates"),
    ({"allocation": "sensitivity"}, "prune.allocation=sensitivity needs prune.target_macs_reduction"),
    ({"allocation": "greedy"}, "prune.allocation=greedy; accepted: uniform, threshold, sensitivity"),
    ({"scope": "stages"}, "prune.scope=stages; accepted: default, stage, all"),
    ({"min_channels": 0}, "prune.min_channels=0; accepted: >= 1"),
    ({"target_macs_reduction": 1.2}, "prune.target_macs_reduction=1.2; accepted: a number in (0, 1)"),
    ({"target_macs_reduction": math.nan}, "prune.target_macs_reduction=nan; accepted: a number in (0, 1)"),
    ({"threshold": math.nan}, "prune.threshold=nan; accepted: a finite number"),
    ({"threshold": math.inf}, "prune.threshold=inf; accepted: a finite number"),
    ({"threshold": -math.inf}, "prune.threshold=-inf; accepted: a finite number"),
    ({"round_to": 0}, "prune.round_to=0; accepted: >= 1 (1: off)"),
    ({"sensitivity_grid": (0.5, math.nan)}, "prune.sensitivity_grid=[0.5, nan]; accepted: ratios in (0, 1)"),
])
def test_bad_specs_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        PlanSpec(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": "abc"}, "prune.threshold='abc'; accepted: a number or null"),
    ({"ratio": "0.5"}, "prune.ratio='0.5'; accepted: a number"),
    ({"ratio": True}, "prune.ratio=True; accepted: a number"),
    ({"target_macs_reduction": [0.5]}, "prune.target_macs_reduction=[0.5]; accepted: a number or null"),
    ({"min_channels": 1.5}, "prune.min_channels=1.5; accepted: a whole number"),
    ({"min_channels": True}, "prune.min_channels=True; accepted: a whole number"),
    ({"round_to": 8.0}, "prune.round_to=8.0; accepted: a whole number"),
    ({"sensitivity_images": "64"}, "prune.sensitivity_images='64'; accepted: a whole number"),
    ({"sensitivity_grid": [0.5, "a"]}, "prune.sensitivity_grid=(0.5, 'a'); accepted: a list of numbers"),
    ({"sensitivity_grid": 0.5}, "prune.sensitivity_grid=0.5; accepted: a list of numbers"),
    ({"rates": 0.5}, "prune.rates=0.5; accepted: a string or a list of numbers or null"),
    ({"rates": [0.5, None]}, "prune.rates=(0.5, None); accepted: a string or a list of numbers or null"),
    ({"rate_layout": 3, "rates": "[0.5]"}, "prune.rate_layout=3; accepted: a string or null"),
    ({"allocation": None}, "prune.allocation=None; accepted: a string"),
    ({"scope": ["default"]}, "prune.scope=['default']; accepted: a string"),
])
def test_every_field_type_is_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError) as err:
        PlanSpec(**kwargs)
    assert str(err.value) == message


def test_numbers_of_any_kind_and_lists_are_accepted():
    import numpy as np
    spec = PlanSpec(ratio=0, min_channels=np.int64(2), threshold=np.float32(0.5), sensitivity_grid=[0.5, 0.25],
                    rates=None)
    assert spec.sensitivity_grid == (0.25, 0.5) and spec.protocol == "threshold"
    assert PlanSpec(rates=[0.5, 0.25]).rates == (0.5, 0.25)


def test_spec_from_config_takes_plan_keys_only():
    cfg = {"ratio": 0.3, "rates": None, "threshold": None, "target_macs_reduction": None,
           "allocation": "uniform", "sensitivity_grid": [0.5, 0.25], "sensitivity_images": 64,
           "scope": "default", "min_channels": 1, "round_to": 8}
    spec = PlanSpec.from_config(cfg)
    assert spec.ratio == 0.3 and spec.sensitivity_grid == (0.25, 0.5) and spec.protocol == "ratio"
    assert spec.describe()["protocol"] == "ratio" and spec.describe()["ratio"] == 0.3
    assert spec.describe()["round_to"] == 8
    with pytest.raises(ValueError, match="^prune.ration=0.3; accepted: prune.allocation"):
        PlanSpec.from_config({"ration": 0.3})
    with pytest.raises(ValueError, match="^prune.compensate=none; accepted: prune.allocation, prune.latency_batch"):
        PlanSpec.from_config({**cfg, "compensate": "none"})


def test_describe_writes_a_rate_list_as_a_string():
    listed = PlanSpec.from_config({"rates": [0.5, 0.5, 0.5]}).describe()
    assert listed["rates"] == "[0.5, 0.5, 0.5]" and listed["protocol"] == "rates"
    assert PlanSpec(rates="[0.5]*3").describe()["rates"] == "[0.5]*3"
    assert PlanSpec().describe()["rates"] is None


@pytest.mark.parametrize("kwargs, setting", [
    ({"threshold": 0.5}, "prune.threshold"),
    ({"target_macs_reduction": 0.4, "allocation": "threshold"}, "prune.allocation=threshold"),
])
@pytest.mark.parametrize("scorer", ["l1", "hrank", "random"])
def test_threshold_plans_need_a_threshold_scorer_before_any_work(kwargs, setting, scorer):
    model = create_model("resnet8", stage_widths=(4, 8, 16))
    sets = channel_sets(model, X)
    plan = PlanSpec(**kwargs)
    with pytest.raises(ValueError) as err:
        plan.validate(sets, model, scorer=get_scorer(scorer), threshold_scorers=threshold_scorers())
    assert str(err.value) == (f"{setting} needs a scorer with a threshold rule; scorer {scorer!r} has none; "
                              "scorers with one: qsfm, simscore")
    for name in ("qsfm", "simscore"):
        plan.validate(sets, model, scorer=get_scorer(name))
    PlanSpec(target_macs_reduction=0.4).validate(sets, model, scorer=get_scorer(scorer))


@pytest.mark.slow
def test_the_planner_imports_no_scorer():
    code = "import sys, qsfm_cli.plan; print(sorted(m for m in sys.modules if m.startswith('qsfm_cli.scoring')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("kwargs, message", [
    ({"min_channels": 1000}, "prune.min_channels=1000 leaves nothing to prune: the largest channel set of "
                             "prune.scope=default has 16 channels; accepted: 1 to 15"),
    ({"min_channels": 16}, "prune.min_channels=16 leaves nothing to prune"),
    ({"round_to": 16}, "prune.round_to=16 leaves nothing to prune: the largest channel set of prune.scope=default "
                       "has 16 channels and keeps at least prune.min_channels=1; accepted: 1 to 15"),
    ({"round_to": 8, "min_channels": 9}, "prune.round_to=8 leaves nothing to prune: the largest channel set of "
                                         "prune.scope=default has 16 channels and keeps at least "
                                         "prune.min_channels=9; accepted: 1 to 7, 9 to 15"),
])
def test_settings_that_leave_nothing_to_prune_are_refused_before_any_work(kwargs, message):
    model = create_model("resnet8", stage_widths=(4, 8, 16))
    sets = channel_sets(model, X)
    plan = PlanSpec(**kwargs)
    with pytest.raises(ValueError) as err:
        plan.validate(sets, model)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="leaves nothing to prune"):
        make_keep(identity_orders(sets), sets, plan)
    fits = 7 if "1 to 7" in message else 15
    key = "round_to" if "round_to" in kwargs else "min_channels"
    keep, _ = make_keep(identity_orders(sets), sets, PlanSpec(**{**kwargs, key: fits}))
    assert any(len(keep[s.name]) < s.size for s in sets)


# -------------------------------------------------------------------------------------- ratio / rates
def test_removed_count_and_keep_from_counts():
    assert removed_count(0.57, 100) == 57 and removed_count(0.3, 16) == 4 and removed_count(0.0, 8) == 0
    s = channel_sets(create_model("resnet8", stage_widths=(4, 8, 16)), X)[0]
    orders = {s.name: Order(removal=[2, 0, 3, 1])}
    assert keep_from_counts(orders, [s], {s.name: 2}) == {s.name: [1, 3]}
    assert keep_from_counts(orders, [s], {s.name: 0}) == {s.name: [0, 1, 2, 3]}


def test_ratio_removes_floor_of_r_times_c_from_every_set():
    model = create_model("resnet20")
    sets = channel_sets(model, X)
    orders = shuffled_orders(sets)
    keep, info = make_keep(orders, sets, PlanSpec(ratio=0.3))
    for s in sets:
        n = math.floor(0.3 * s.size)
        assert info["removed"][s.name] == n
        assert keep[s.name] == sorted(set(range(s.size)) - set(orders[s.name].removal[:n]))
    keep, _ = make_keep(orders, sets, PlanSpec(ratio=0.57))
    assert len(keep["layer3.0.conv1"]) == 64 - 36          # floor(0.57 * 64) = 36


def test_min_channels_is_kept_in_every_set():
    model = create_model("resnet8", stage_widths=(4, 8, 16))   # 4/8/16 channels
    sets = channel_sets(model, X)
    keep, _ = make_keep(identity_orders(sets), sets, PlanSpec(ratio=0.9, min_channels=3))
    assert {s.name: len(keep[s.name]) for s in sets} == {"layer1.0.conv1": 3, "layer2.0.conv1": 3,
                                                         "layer3.0.conv1": 3}


def test_rate_layouts_chip_hrank_and_per_set():
    model = create_model("resnet56")
    stage = channel_sets(model, X, "stage")
    plan = PlanSpec(rates="[0.]+[0.15]*2+[0.4]*27", scope="stage")
    plan.validate(stage, model)
    keep, info = make_keep(identity_orders(stage), stage, plan, model=model)
    assert info["layout"] == "chip"
    assert len(keep["conv1"]) == 16 and len(keep["layer1.0.conv2"]) == 13 and len(keep["layer2.0.conv2"]) == 27
    assert len(keep["layer3.0.conv2"]) == 64 and len(keep["layer1.0.conv1"]) == 9 and len(keep["layer3.8.conv1"]) == 38

    default = channel_sets(model, X)
    hrank = PlanSpec(rates="[0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]")
    keep, info = make_keep(identity_orders(default), default, hrank, model=model)
    assert info["layout"] == "hrank" and "ignored" in info["notes"][0]
    assert len(keep["layer3.0.conv1"]) == 64 and len(keep["layer1.0.conv1"]) == 6 and len(keep["layer3.8.conv1"]) == 57

    keep, info = make_keep(identity_orders(default), default, PlanSpec(rates="[0.5]*27"), model=model)
    assert info["layout"] == "per-set" and len(keep["layer2.3.conv1"]) == 16


def test_rate_string_of_the_wrong_length_names_the_layouts():
    model = create_model("resnet56")
    sets = channel_sets(model, X)
    with pytest.raises(ValueError) as err:
        PlanSpec(rates="[0.]+[0.4]*28").validate(sets, model)
    msg = str(err.value)
    assert msg.startswith("prune.rates has 29 entries; this model accepts 30 (CHIP") and "55 (HRank" in msg
    assert "27 (one entry per channel set of the scope" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="entry 0 prunes 'conv1', which is not in prune.scope=default; use "
                                         "prune.scope=stage"):
        PlanSpec(rates="[0.]+[0.15]*2+[0.4]*27").validate(sets, model)
    vgg = create_model("vgg16_bn")
    with pytest.raises(ValueError, match="has 12 entries; this model accepts 13 "):
        PlanSpec(rates="[0.3]*12").validate(channel_sets(vgg, X), vgg)


def test_a_rate_list_fitting_several_layouts_must_name_one():
    model = create_model("resnet8", stage_widths=(4, 8, 16))   # stage scope: 7 sets; HRank: 7 convs
    sets = channel_sets(model, X, "stage")
    rates = "[0.]+[0.5]*6"
    with pytest.raises(ValueError) as err:
        PlanSpec(rates=rates, scope="stage").validate(sets, model)
    msg = str(err.value)
    assert msg.startswith("prune.rates has 7 entries, which fits several layouts of this model: hrank (HRank")
    assert "; per-set (one entry per channel set" in msg and msg.endswith("prune.rate_layout=<hrank|per-set>")
    orders = identity_orders(sets)
    keep, info = make_keep(orders, sets, PlanSpec(rates=rates, scope="stage", rate_layout="hrank"), model=model)
    assert info["layout"] == "hrank" and len(keep["conv1"]) == 4 and len(keep["layer1.0.conv1"]) == 2
    keep, info = make_keep(orders, sets, PlanSpec(rates=rates, scope="stage", rate_layout="per-set"), model=model)
    assert info["layout"] == "per-set" and len(keep["conv1"]) == 4 and len(keep["layer3.0.conv1"]) == 8
    assert len(keep["layer1.0.conv2"]) == 2
    with pytest.raises(ValueError, match="^prune.rate_layout=HRank; accepted for this model: chip, "
                                         "hrank, per-set$"):
        PlanSpec(rates=rates, scope="stage", rate_layout="HRank").validate(sets, model)
    with pytest.raises(ValueError, match=r"prune.rates has 7 entries; prune.rate_layout=chip takes 6 \(CHIP"):
        PlanSpec(rates=rates, scope="stage", rate_layout="chip").validate(sets, model)


def test_a_rate_outside_the_range_names_its_layout_entry():
    model = create_model("resnet56")
    stage = channel_sets(model, X, "stage")
    plan = PlanSpec(rates="[0.]+[0.15]*2+[1.2]+[0.4]*26", scope="stage")    # parses: checked with the layout
    with pytest.raises(ValueError) as err:
        plan.validate(stage, model)
    assert str(err.value) == ("prune.rates entry 3 (chip layout: layer1.0.conv1) is 1.2; every rate must be "
                              "in [0, 1)")
    hrank = PlanSpec(rates=[0.1, 0.5, 1.0] + [0.5] * 52)                  # entry 2 is a conv2 entry
    with pytest.raises(ValueError, match=r"^prune.rates entry 2 \(hrank layout: an entry its paper's code "
                                         r"ignores\) is 1.0; every rate must be in \[0, 1\)$"):
        make_keep(identity_orders(channel_sets(model, X)), channel_sets(model, X), hrank, model=model)


# ------------------------------------------------------------------------------------------ threshold
def test_threshold_counts_leading_values_at_or_above_tau():
    model = create_model("resnet20")
    sets = channel_sets(model, X)
    values = lambda s: [math.inf, 0.9, 0.8, 0.8] + [0.1] * (s.size - 5) + [-math.inf]  # noqa: E731
    keep, info = make_keep(identity_orders(sets, values), sets, PlanSpec(threshold=0.8))
    assert all(n == 4 for n in info["removed"].values())
    keep, info = make_keep(identity_orders(sets, values), sets, PlanSpec(threshold=-1e9, min_channels=2))
    assert all(len(keep[s.name]) == 2 for s in sets)


def test_threshold_without_values_asks_for_a_threshold_scorer():
    sets = channel_sets(create_model("resnet20"), X)
    with pytest.raises(ValueError, match=r"needs removal orders with threshold values \(Order.values\); the order "
                                         "of 'layer1.0.conv1' has none: choose a scorer with a threshold rule"):
        make_keep(identity_orders(sets), sets, PlanSpec(threshold=0.5))


# --------------------------------------------------------------------------------------- MACs targets
@pytest.mark.parametrize("target", [0.3, 0.48, 0.6])
def test_target_macs_reduction_is_reached_with_a_uniform_ratio(target):
    model = create_model("resnet20")
    sets = channel_sets(model, X)
    keep, info = make_keep(shuffled_orders(sets), sets, PlanSpec(target_macs_reduction=target),
                           model=model, example_input=X)
    reached = 1 - count_macs(apply_keep(model, keep, X)) / count_macs(model)
    assert abs(reached - target) <= 0.005 and math.isclose(info["macs_reduction"], reached)
    assert 0 < info["ratio"] < 1 and "note" not in info


def test_target_macs_reduction_by_global_threshold():
    model = create_model("resnet20")
    sets = channel_sets(model, X)
    g = torch.Generator().manual_seed(0)
    values = lambda s: sorted(torch.rand(s.size, generator=g).tolist(), reverse=True)  # noqa: E731
    orders = identity_orders(sets, values)
    keep, info = make_keep(orders, sets, PlanSpec(target_macs_reduction=0.4, allocation="threshold"),
                           model=model, example_input=X)
    assert abs(info["macs_reduction"] - 0.4) <= 0.005
    removed = make_keep(orders, sets, PlanSpec(threshold=info["threshold"]))[1]["removed"]
    for name in info.get("next_step_sets", []):  # these take the next threshold's count
        removed[name] = make_keep(orders, sets, PlanSpec(threshold=info["next_step"]))[1]["removed"][name]
    assert info["removed"] == removed


def test_unreachable_target_fails_clearly():
    model = create_model("resnet8", stage_widths=(4, 8, 16))
    sets = channel_sets(model, X)
    with pytest.raises(ValueError, match="prune.target_macs_reduction=0.9 cannot be reached"):
        make_keep(identity_orders(sets), sets, PlanSpec(target_macs_reduction=0.9), model=model, example_input=X)


def test_sensitivity_allocation_spares_sensitive_sets():
    model = create_model("resnet20")
    sets = channel_sets(model, X)
    weights = {s.name: (10.0 if s.name.startswith("layer1") else 1.0) for s in sets}

    def loss_of(pruned: nn.Module) -> float:  # a known sensitivity: weight x (removed fraction)^2
        return sum(w * (1 - pruned.get_submodule(n).out_channels / model.get_submodule(n).out_channels) ** 2
                   for n, w in weights.items())

    plan = PlanSpec(target_macs_reduction=0.3, allocation="sensitivity", sensitivity_grid=(0.25, 0.5, 0.75))
    keep, info = make_keep(identity_orders(sets), sets, plan, model=model, example_input=X, loss_of=loss_of)
    assert abs(info["macs_reduction"] - 0.3) <= 0.005
    ratio = {n: 1 - len(k) / model.get_submodule(n).out_channels for n, k in keep.items()}
    assert max(ratio[n] for n in ratio if n.startswith("layer1")) < min(ratio[n] for n in ratio
                                                                        if not n.startswith("layer1"))
    table = info["sensitivity"]
    assert table["grid"] == [0.25, 0.5, 0.75] and math.isclose(table["layers"]["layer1.0.conv1"]["loss_increase"][1],
                                                              10 * 0.5 ** 2)
    assert "layer3.2.conv1" in format_sensitivity(table)
    # A cached table is reused: no loss is evaluated again.
    again, _ = make_keep(identity_orders(sets), sets, plan, model=model, example_input=X,
                         loss_of=lambda m: pytest.fail("recomputed"), sensitivity=table)
    assert again == keep
    with pytest.raises(ValueError, match=r"the sensitivity table was measured with \{'min_channels': 1, "
                                         r"'round_to': 1\}, this plan has \{'min_channels': 1, 'round_to': 8\}; "
                                         "measure it again"):
        make_keep(identity_orders(sets), sets, PlanSpec(**{**plan.__dict__, "round_to": 8}), model=model,
                  example_input=X, sensitivity=table)


@pytest.mark.slow
def test_a_params_target_prices_parameters_into_the_allocation():
    """QSFM's profile removes more parameters than MACs: the stage streams must be pruned although they cost
    more loss per MAC; the price on kept parameters is raised until the parameters fall far enough."""
    model = create_model("resnet20")
    sets = channel_sets(model, X, "all")
    weights = {s.name: (3.0 if s.name in ("conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2") else 1.0)
               for s in sets}

    def loss_of(pruned: nn.Module) -> float:
        return sum(w * (1 - pruned.get_submodule(n).out_channels / model.get_submodule(n).out_channels) ** 2
                   for n, w in weights.items())

    def params_reduction(keep) -> float:
        return 1 - count_params(apply_keep(model, keep, X)) / count_params(model)

    grid = (0.25, 0.5, 0.75)
    plain = PlanSpec(target_macs_reduction=0.3, allocation="sensitivity", sensitivity_grid=grid, scope="all")
    free, _ = make_keep(identity_orders(sets), sets, plain, model=model, example_input=X, loss_of=loss_of)
    want = round(params_reduction(free) + 0.1, 3)
    priced = PlanSpec(**{**plain.__dict__, "target_params_reduction": want})
    keep, info = make_keep(identity_orders(sets), sets, priced, model=model, example_input=X, loss_of=loss_of)
    assert abs(info["macs_reduction"] - 0.3) <= 0.005 and info["params_price"] > 0
    assert info["params_reduction"] == pytest.approx(params_reduction(keep)) and info["params_reduction"] >= want
    assert all(row["params_saved"][0] > 0 for row in info["sensitivity"]["layers"].values())
    with pytest.raises(ValueError, match=r"^prune.target_params_reduction=0.99 is beyond reach at "
                                         r"prune.target_macs_reduction=0.3: at most"):
        make_keep(identity_orders(sets), sets, PlanSpec(**{**plain.__dict__, "target_params_reduction": 0.99}),
                  model=model, example_input=X, sensitivity=info["sensitivity"])


@pytest.mark.parametrize("fields, message", [
    ({"target_params_reduction": 0.5}, "prune.target_params_reduction needs prune.allocation=sensitivity and "
                                       "prune.target_macs_reduction (the parameters are priced in the allocation)"),
    ({"target_params_reduction": 1.5, "target_macs_reduction": 0.5, "allocation": "sensitivity"},
     "prune.target_params_reduction=1.5; accepted: a number in (0, 1)"),
])
def test_a_params_target_needs_the_sensitivity_allocation(fields, message):
    with pytest.raises(ValueError) as err:
        PlanSpec(**fields)
    assert str(err.value) == message


def test_sensitivity_table_marks_ratios_below_min_channels():
    model = create_model("resnet8", stage_widths=(4, 8, 16))
    sets = channel_sets(model, X)
    table = measure_sensitivity(sets, identity_orders(sets), (0.5, 0.9), lambda k: apply_keep(model, k, X),
                                lambda m: 0.0, MacsMeter(model, X), min_channels=2)
    assert table["layers"]["layer1.0.conv1"]["loss_increase"] == [0.0, None]   # 4 channels: 0.9 leaves 1


def test_sensitivity_table_settles_counts_and_skips_repeated_ones():
    model = create_model("resnet8", stage_widths=(4, 8, 16))
    sets = channel_sets(model, X)
    calls = []
    table = measure_sensitivity(sets, identity_orders(sets), (0.25, 0.5, 0.75), lambda k: apply_keep(model, k, X),
                                lambda m: calls.append(m) or 0.0, MacsMeter(model, X), round_to=4)
    rows = {name: row["removed"] for name, row in table["layers"].items()}
    # 4 channels: nothing to remove; 8: only down to 4; 16: kept 12, 8, then 4+ rounds up to 4 (0.75 leaves 4)
    assert rows == {"layer1.0.conv1": [None, None, None], "layer2.0.conv1": [None, 4, None],
                    "layer3.0.conv1": [4, 8, 12]}
    assert len(calls) == 1 + 4 and table["round_to"] == 4 and table["min_channels"] == 1


@pytest.mark.parametrize("progress", [True, False])
def test_sensitivity_shows_a_progress_bar_when_asked(progress, capsys):
    model = create_model("resnet8", stage_widths=(4, 8, 16))
    sets = channel_sets(model, X)
    measure_sensitivity(sets, identity_orders(sets), (0.5,), lambda k: apply_keep(model, k, X), lambda m: 0.0,
                        MacsMeter(model, X), progress=progress)
    err = capsys.readouterr().err
    assert ("sensitivity:" in err and "0/4" in err) == progress and (err == "") != progress   # 1 + 3 losses


# ------------------------------------------------------------------------------------------ round_to
@pytest.mark.parametrize("count, size, min_channels, round_to, settled", [
    (5, 16, 1, 1, 5), (20, 16, 1, 1, 15), (5, 16, 12, 1, 4), (5, 4, 8, 1, 0),
    (5, 16, 1, 8, 0),      # keeps 11 -> 16: the whole set
    (9, 16, 1, 8, 8),      # keeps 7 -> 8
    (16, 16, 1, 8, 8),     # never below 8
    (10, 24, 1, 16, 8),    # keeps 14 -> 16
    (2, 24, 1, 16, 0),     # keeps 22 -> 32 > 24: whole
    (10, 16, 9, 4, 4),     # min_channels 9 -> keeps 9 -> 12
    (3, 8, 1, 8, 0),       # a set no larger than round_to stays whole
])
def test_settle_rounds_the_kept_count_up_to_a_multiple(count, size, min_channels, round_to, settled):
    assert settle(count, size, min_channels, round_to) == settled


ROUND_TO = 6      # ResNet-20's sets have 16, 32, 64 channels: none a multiple, so the whole-set rule is exercised
MEASURING = ("target_macs_reduction", "target_speedup")   # protocols that search, planning many times over
EXAMPLES = {      # protocol -> PlanSpec fields of a plan that prunes; a newly registered protocol needs one here
    "ratio": [{"ratio": 0.45}],
    "rates": [{"rates": "[0.2]*3+[0.5]*3+[0.7]*3"}],
    "threshold": [{"threshold": 0.35}],
    "target_macs_reduction": [{"target_macs_reduction": 0.45, "allocation": a} for a in ALLOCATIONS],
    "target_speedup": [{"target_speedup": 1.6, "allocation": a, "latency_runtime": "torch"}
                       for a in ("uniform", "sensitivity")],
}


def graded_orders(sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: Order(removal=torch.randperm(s.size, generator=g).tolist(),
                          values=sorted(torch.rand(s.size, generator=g).tolist(), reverse=True)) for s in sets}


@pytest.mark.parametrize("protocol", [pytest.param(name, marks=pytest.mark.slow) if name in MEASURING else name
                                      for name in PROTOCOLS.names()])
def test_every_protocol_keeps_multiples_of_round_to(protocol, monkeypatch):
    macs_clock(monkeypatch)
    model = create_model("resnet20")
    sets = channel_sets(model, X)
    orders = graded_orders(sets)
    sizes = {s.name: s.size for s in sets}

    def loss_of(pruned: nn.Module) -> float:
        return sum((1 - pruned.get_submodule(n).out_channels / c) ** 2 for n, c in sizes.items())

    for fields in EXAMPLES[protocol]:
        spec = PlanSpec(**fields, round_to=ROUND_TO)
        assert spec.protocol == protocol
        prepared = spec.strategy.prepare(spec, model, X, sets, lambda kind, key, compute: compute())
        keep, info = make_keep(orders, sets, spec, model=model, example_input=X, loss_of=loss_of, prepared=prepared)
        kept = {n: len(k) for n, k in keep.items()}
        assert all(k % ROUND_TO == 0 or k == sizes[n] for n, k in kept.items()), kept
        assert any(k < sizes[n] for n, k in kept.items())
        assert info["removed"] == {n: sizes[n] - k for n, k in kept.items()}
        if protocol == "target_macs_reduction":
            reached = 1 - count_macs(apply_keep(model, keep, X)) / count_macs(model)
            assert abs(reached - spec.target_macs_reduction) <= TOLERANCE and "note" not in info
        elif protocol == "target_speedup":
            assert info["predicted_speedup"] >= spec.target_speedup and "note" not in info
        else:   # rounding the kept count up removes a prefix of what the unrounded plan removes
            plain = make_keep(orders, sets, PlanSpec(**fields), model=model)[1]["removed"]
            assert all(0 <= plain[n] - info["removed"][n] < ROUND_TO for n in sizes)
            assert info["removed"] != plain


@pytest.mark.slow
@pytest.mark.parametrize("allocation, target", [("uniform", 0.48), ("threshold", 0.3)])
def test_a_resnet56_target_search_with_round_to_8_lands_within_tolerance(allocation, target):
    model = create_model("resnet56")
    sets = channel_sets(model, X)
    orders = graded_orders(sets)
    keep, info = make_keep(orders, sets, PlanSpec(target_macs_reduction=target, allocation=allocation, round_to=8),
                           model=model, example_input=X)
    assert all(len(k) % 8 == 0 for k in keep.values())
    reached = 1 - count_macs(apply_keep(model, keep, X)) / count_macs(model)
    assert abs(reached - target) <= TOLERANCE and math.isclose(info["macs_reduction"], reached)
    if allocation == "threshold":   # one set's step of 8 channels is worth up to 1.9 points: sets are raised
        plain = make_keep(orders, sets, PlanSpec(threshold=info["threshold"], round_to=8))[1]["removed"]
        assert info["raised_sets"] and all(info["removed"][n] == plain[n] + 8 * (n in info["raised_sets"])
                                           for n in plain)
