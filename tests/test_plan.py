"""Protocols -> Keep: ratio, rate strings, threshold, MACs target (uniform / threshold / sensitivity)."""
import math

import pytest
import torch
from torch import nn

from qsfm_cli.data import ImageSet
from qsfm_cli.evaluate import count_macs
from qsfm_cli.models import create_model
from qsfm_cli.plan import (MacsMeter, PlanSpec, format_sensitivity, heldout_loss, keep_from_counts, make_keep,
                           measure_sensitivity, parse_rates, removed_count)
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.scoring import get_scorer
from qsfm_cli.types import Order

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


# ------------------------------------------------------------------------------------------------ spec
@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.5}, "prune.ratio must be in [0, 1), got 1.5"),
    ({"ratio": 1.0}, "prune.ratio must be in [0, 1), got 1.0"),
    ({"rates": "[0.5]*2", "threshold": 0.9}, "prune.rates and prune.threshold are both set"),
    ({"rate_layout": "chip"}, "prune.rate_layout=chip needs prune.rates"),
    ({"allocation": "sensitivity"}, "prune.allocation=sensitivity needs prune.target_macs_reduction"),
    ({"allocation": "greedy"}, "unknown prune.allocation 'greedy'; accepted: uniform, threshold, sensitivity"),
    ({"scope": "stages"}, "unknown prune.scope 'stages'; accepted: default, stage, all"),
    ({"min_channels": 0}, "prune.min_channels must be >= 1, got 0"),
    ({"target_macs_reduction": 1.2}, "prune.target_macs_reduction must be in (0, 1), got 1.2"),
])
def test_bad_specs_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        PlanSpec(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_spec_from_config_names_unknown_keys():
    cfg = {"ratio": 0.3, "rates": None, "threshold": None, "target_macs_reduction": None,
           "allocation": "uniform", "sensitivity_grid": [0.5, 0.25], "sensitivity_images": 64,
           "scope": "default", "min_channels": 1}
    spec = PlanSpec.from_config(cfg)
    assert spec.ratio == 0.3 and spec.sensitivity_grid == (0.25, 0.5) and spec.protocol == "ratio"
    assert spec.describe()["protocol"] == "ratio" and spec.describe()["ratio"] == 0.3
    with pytest.raises(ValueError, match="unknown key prune.ration; accepted: allocation"):
        PlanSpec.from_config({"ration": 0.3})
    with pytest.raises(ValueError, match="unknown key prune.compensate; accepted: allocation"):
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
        plan.validate(sets, model, scorer=get_scorer(scorer))
    assert str(err.value) == (f"{setting} needs a scorer with a threshold rule; scorer {scorer!r} has none; "
                              "scorers with one: qsfm, simscore")
    for name in ("qsfm", "simscore"):
        plan.validate(sets, model, scorer=get_scorer(name))
    PlanSpec(target_macs_reduction=0.4).validate(sets, model, scorer=get_scorer(scorer))


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
    with pytest.raises(ValueError, match="unknown prune.rate_layout 'HRank'; accepted for this model: chip, "
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


def test_threshold_without_values_names_the_scorers_that_have_one():
    sets = channel_sets(create_model("resnet20"), X)
    with pytest.raises(ValueError, match="prune.threshold needs a scorer with a threshold rule.*qsfm, simscore"):
        make_keep(identity_orders(sets), sets, PlanSpec(threshold=0.5))


# --------------------------------------------------------------------------------------- MACs targets
@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "mobilenetv2", "tv_resnet18"])
def test_macs_meter_matches_the_flop_counter_on_pruned_models(name):
    model = create_model(name)
    x = torch.zeros(1, 3, 32, 32)
    meter = MacsMeter(model, x)
    assert meter.exact
    sets = channel_sets(model, x, "all")
    keep, _ = make_keep(shuffled_orders(sets), sets, PlanSpec(ratio=0.4))
    pruned = apply_keep(model, keep, x)
    assert meter(pruned) == count_macs(pruned, (1, 3, 32, 32)) < meter.base


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


def test_sensitivity_table_marks_ratios_below_min_channels():
    model = create_model("resnet8", stage_widths=(4, 8, 16))
    sets = channel_sets(model, X)
    table = measure_sensitivity(sets, identity_orders(sets), (0.5, 0.9), lambda k: apply_keep(model, k, X),
                                lambda m: 0.0, MacsMeter(model, X), min_channels=2)
    assert table["layers"]["layer1.0.conv1"]["loss_increase"] == [0.0, None]   # 4 channels: 0.9 leaves 1


def test_heldout_slice_avoids_the_collected_images():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    ds = ImageSet(images, torch.zeros(40, dtype=torch.long), 2, (0.0,) * 3, (1.0,) * 3)
    collected = set(ds.sample(16, seed=3).images[:, 0, 0, 0].tolist())
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.extend(x[:, 0, 0, 0].round().long().tolist())
            return torch.zeros(len(x), 2)

    heldout_loss(ds, 10, skip=16, seed=3, batch_size=4)(Probe())
    assert len(seen) == 10 and not collected & set(seen)
    with pytest.raises(ValueError, match="no training images left"):
        heldout_loss(ds, 10, skip=40, seed=3)
