"""Latency table and the speed-up target: built, cached and reused; a plan meets its predicted target; the
run records predicted and measured speed-ups; an unreachable target is refused before any statistics."""
import json

import pytest
import torch

from qsfm_cli import latency_table as lt
from qsfm_cli.counting import count_macs
from qsfm_cli.models import create_model
from qsfm_cli.pipeline import run_experiment
from qsfm_cli.plan import PlanSpec, make_keep
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.record import RunRecord

from .conftest import macs_clock
from .test_e2e import experiment
from .test_plan import identity_orders

X = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny():
    model = create_model("resnet8", stage_widths=[4, 8, 16]).eval()
    return model, channel_sets(model, X)


@pytest.fixture
def macs_table(monkeypatch, tiny):
    macs_clock(monkeypatch)
    model, sets = tiny
    return lt.build_table(model, X, sets, runtime="torch", batch=2, threads=1, repeats=3)


def test_grid_holds_the_ends_and_the_kernel_multiples():
    assert lt.grid_widths(16) == [1, 4, 8, 12, 16]
    assert lt.grid_widths(45) == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 45]
    wide = lt.grid_widths(512)
    assert {1, 16, 256, 512} <= set(wide) and len(wide) <= 33 and all(w % 16 == 0 for w in wide[1:-1])


@pytest.mark.parametrize("runtime", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_table_times_every_set_at_its_grid(runtime, tiny):
    model, sets = tiny
    table = lt.build_table(model, X, sets, runtime=runtime, batch=2, threads=1, repeats=3)
    assert table["grids"] == {s.name: lt.grid_widths(s.size) for s in sets}
    assert {name for layer in table["layers"].values() for name in layer["ms"]} == {s.name for s in sets}
    # ONNX Runtime folds BatchNorm into the conv before it: only the convs are timed there.
    bn = {name for name in table["layers"] if ".bn" in name}
    assert (bn == set()) == (runtime == "onnxruntime")
    for layer in table["layers"].values():
        for name, ms in layer["ms"].items():
            assert len(ms) == len(table["grids"][name]) and ms[-1] == layer["full_ms"] and min(ms) > 0
    assert lt.predict_ms(table, {}) == pytest.approx(table["base_ms"]) and table["base_ms"] > 0
    assert table["timed_shapes"] > 0 and table["build_s"] > 0


def test_prediction_under_a_macs_clock_is_the_macs_count(macs_table, tiny):
    model, sets = tiny
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        kept = {s.name: int(torch.randint(1, s.size + 1, (1,), generator=g)) for s in sets}
        pruned = apply_keep(model, {n: list(range(k)) for n, k in kept.items()}, X)
        assert lt.predict_ms(macs_table, kept) == pytest.approx(count_macs(pruned) / 1e6)
    # between grid widths the timings are interpolated: a width off the grid lands between its neighbours
    name = sets[-1].name
    at = [lt.predict_ms(macs_table, {name: w}) for w in (4, 6, 8)]
    assert at[0] < at[1] < at[2] and at[1] == pytest.approx((at[0] + at[2]) / 2)
    with pytest.raises(ValueError, match="no channel set nope"):
        lt.predict_ms(macs_table, {"nope": 1})


def test_a_block_timed_whole_carries_what_its_layers_alone_miss(monkeypatch, tiny):
    """A clock under which a block runs slower at an odd width of its inner set than its layers add up to
    (as ONNX Runtime does when a width leaves its blocked layout): the table's prediction carries the
    difference, and stays the MACs count at even widths."""
    from qsfm_cli.counting import count_macs

    def time_shapes(shapes, groups, **_):
        def ms(module, shape):
            odd = any(isinstance(m, torch.nn.Conv2d) and m.in_channels % 2 for m in module.modules())
            return count_macs(module, (1, *shape)) / 1e6 + (5.0 if odd and "Block" in type(module).__name__ else 0)
        return {sig: ms(*entry) for sig, entry in shapes.items()}

    macs_clock(monkeypatch)
    monkeypatch.setattr(lt, "_time_shapes", time_shapes)
    model, sets = tiny
    table = lt.build_table(model, X, sets, runtime="torch", batch=2, threads=1, repeats=3)
    assert {unit["block"] for unit in table["units"].values()} == {"layer1.0", "layer2.0", "layer3.0"}
    inner = sets[-1].name
    for width in (1, 4, 8, 12):
        pruned = apply_keep(model, {inner: list(range(width))}, X)
        penalty = 5.0 if width % 2 else 0.0
        assert lt.predict_ms(table, {inner: width}) == pytest.approx(count_macs(pruned) / 1e6 + penalty)


def sensitivity_table(sets):
    return {"grid": [0.25, 0.5, 0.75], "base_loss": 1.0, "min_channels": 1, "round_to": 1,
            "layers": {s.name: {"removed": [], "macs_saved": [],
                                "loss_increase": [0.01 * (i + 1), 0.05 * (i + 1), 0.2 * (i + 1)]}
                       for i, s in enumerate(sets)}}


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_a_plan_meets_its_predicted_target(macs_table, tiny, allocation):
    model, sets = tiny
    spec = PlanSpec(target_speedup=1.8, allocation=allocation, latency_runtime="torch", latency_batch=2,
                    latency_replans=0)
    keep, info = make_keep(identity_orders(sets), sets, spec, model=model, example_input=X, prepared=macs_table,
                           sensitivity=sensitivity_table(sets))
    kept = {n: len(k) for n, k in keep.items()}
    assert info["protocol"] == "target_speedup" and info["predicted_speedup"] >= 1.8
    assert lt.predicted_speedup(macs_table, kept) == pytest.approx(info["predicted_speedup"])
    assert info["latency_table"]["runtime"] == "torch" and 0 < info["macs_reduction"] < 1
    if allocation == "sensitivity":
        assert info["kept_widths"] == kept and info["predicted_loss_increase"] > 0
        # the widths come from the table's grid (kernel multiples) or the widest pruning the grid measured
        assert all(w in lt.grid_widths(s.size) or w == s.size - int(0.75 * s.size) for s in sets
                   for w in [kept[s.name]])


def test_sets_that_share_layers_still_reach_a_target_near_the_largest(monkeypatch, tiny):
    """Residual streams and the blocks along them save less together than apart: the allocation aims at
    more summed savings until the prediction reaches the target."""
    macs_clock(monkeypatch)
    model, _ = tiny
    sets = channel_sets(model, X, scope="all")
    table = lt.build_table(model, X, sets, runtime="torch", batch=2, threads=1, repeats=3)
    sens = sensitivity_table(sets)
    fewest = {s.name: s.size - int(0.75 * s.size) for s in sets}
    target = 0.95 * lt.predicted_speedup(table, fewest)
    spec = PlanSpec(target_speedup=target, allocation="sensitivity", latency_runtime="torch", latency_batch=2,
                    latency_replans=0, scope="all")
    _, info = make_keep(identity_orders(sets), sets, spec, model=model, example_input=X, prepared=table,
                        sensitivity=sens)
    assert info["predicted_speedup"] >= target and "note" not in info


@pytest.mark.parametrize("kwargs, message", [
    ({"target_speedup": 0.5}, "prune.target_speedup=0.5; accepted: a number > 1"),
    ({"target_speedup": 2.0, "latency_runtime": "tensorrt"},
     "prune.latency_runtime=tensorrt; accepted: torch, onnxruntime"),
    ({"target_speedup": 2.0, "latency_batch": 0}, "prune.latency_batch=0; accepted: a whole number >= 1"),
    ({"target_speedup": 2.0, "allocation": "threshold"},
     "prune.allocation=threshold with prune.target_speedup; accepted: uniform, sensitivity"),
    ({"target_speedup": 2.0, "target_macs_reduction": 0.5}, "are both set"),
])
def test_bad_speed_settings_fail_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        PlanSpec(**kwargs)
    assert "\n" not in str(err.value)


SPEED = ("prune.target_speedup=1.3", "prune.latency_runtime=torch", "prune.latency_batch=4",
         "prune.latency_repeats=3", "prune.latency_replans=0")


def fake_pair(monkeypatch, slower: float, trusted: bool = True) -> list[float]:
    """``measure_pair`` in the speed protocol answering ``slower`` times the MACs speed-up (what a table
    under the MACs clock predicts); returns the speed-ups it answered."""
    from qsfm_cli.latency import PairLatency
    from qsfm_cli.plan import speed

    answered = []

    def measure_pair(base, pruned, batches, **_):
        speedup = slower * count_macs(base) / count_macs(pruned)
        answered.append(speedup)
        return [PairLatency("torch", batches[0], 1, speedup, 1.0, 0.01, 0.01, speedup, trusted, 0.1, 10)]

    monkeypatch.setattr(speed, "measure_pair", measure_pair)
    return answered


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_a_plan_the_table_overrates_is_made_again_until_measured_at_the_target(monkeypatch, macs_table, tiny,
                                                                              allocation):
    model, sets = tiny
    answered = fake_pair(monkeypatch, slower=0.8)
    spec = PlanSpec(target_speedup=1.5, allocation=allocation, latency_runtime="torch", latency_batch=2)
    keep, info = make_keep(identity_orders(sets), sets, spec, model=model, example_input=X, prepared=macs_table,
                           sensitivity=sensitivity_table(sets))
    rounds, goal = info["replans"], 1.5 * (1 + spec.speedup_tolerance / 2)     # half the tolerance above
    assert rounds[0]["aim"] == 1.5 and rounds[0]["measured_speedup"] < 1.5 and len(rounds) >= 2
    assert rounds[1]["aim"] == pytest.approx(goal * rounds[0]["predicted_speedup"] / rounds[0]["measured_speedup"])
    assert [r["measured_speedup"] for r in rounds] == answered
    kept = {n: len(k) for n, k in keep.items()}
    [chosen] = [r for r in rounds if r.get("chosen")]
    assert chosen["predicted_speedup"] == pytest.approx(lt.predicted_speedup(macs_table, kept))
    assert chosen["measured_speedup"] >= goal and "note" not in info
    assert min(r["measured_speedup"] for r in rounds if r["measured_speedup"] >= goal) == chosen["measured_speedup"]


def test_the_same_plan_comes_out_again_from_the_kept_measurements(monkeypatch, macs_table, tiny):
    """Measurements differ from run to run; kept in the cache, they give the same channels again."""
    model, sets = tiny
    answered = fake_pair(monkeypatch, slower=0.8)
    store = {}

    def cached(kind, key, compute):
        if (kind, key) not in store:
            store[kind, key] = compute()
        return store[kind, key]

    spec = PlanSpec(target_speedup=1.5, latency_runtime="torch", latency_batch=2)
    first = make_keep(identity_orders(sets), sets, spec, model=model, example_input=X, prepared=macs_table,
                      cached=cached)
    measured = len(answered)
    fake_pair(monkeypatch, slower=0.6)          # a slower machine now: only the cache can give the same plan
    second = make_keep(identity_orders(sets), sets, spec, model=model, example_input=X, prepared=macs_table,
                       cached=cached)
    assert measured >= 2 and {kind for kind, _ in store} == {"plan_latency"}
    assert first == second


def test_an_untrusted_measurement_keeps_the_tables_plan(monkeypatch, macs_table, tiny):
    model, sets = tiny
    fake_pair(monkeypatch, slower=0.8, trusted=False)
    spec = PlanSpec(target_speedup=1.5, latency_runtime="torch", latency_batch=2)
    _, info = make_keep(identity_orders(sets), sets, spec, model=model, example_input=X, prepared=macs_table)
    assert len(info["replans"]) == 1 and info["predicted_speedup"] >= 1.5


@pytest.mark.slow
def test_run_builds_the_table_once_and_records_predicted_and_measured_speedups(tmp_path, monkeypatch):
    macs_clock(monkeypatch)
    first = run_experiment(experiment(tmp_path, *SPEED, run="a"))
    second = run_experiment(experiment(tmp_path, *SPEED, "scorer=random", run="b"))
    assert (first.cache["latency_table"], second.cache["latency_table"]) == ("miss", "hit")
    for record in (first, second):
        speed = record.results.speed
        assert speed["target_speedup"] == 1.3 and speed["predicted_speedup"] >= 1.3
        assert speed["measured_speedup"] > 0 and isinstance(speed["trusted"], bool)
        assert (speed["runtime"], speed["batch"], speed["threads"]) == ("torch", 4, 1)
        assert record.results.plan["latency_table"]["batch"] == 4
    again = RunRecord.from_dict(first.to_dict())
    assert again.results.speed == first.results.speed
    header = (tmp_path / "a" / "results.csv").read_text().splitlines()[0].split(",")
    for column in ("prune.target_speedup", "prune.latency_runtime", "prune.latency_batch", "prune.latency_threads",
                   "predicted_speedup", "measured_speedup", "measured_speedup_trusted"):
        assert column in header


@pytest.mark.slow
def test_a_run_records_its_replans_and_a_second_run_reads_them_from_the_cache(tmp_path, monkeypatch):
    macs_clock(monkeypatch)
    fake_pair(monkeypatch, slower=0.8)
    speed = [*SPEED[:-1], "prune.latency_replans=2"]
    first = run_experiment(experiment(tmp_path, *speed, run="a"))
    second = run_experiment(experiment(tmp_path, *speed, run="b"))
    assert len(first.results.plan["replans"]) >= 2 and first.cache["plan_latency"] == "miss"
    assert second.cache["plan_latency"] == "hit" and second.results.plan["removed"] == first.results.plan["removed"]


@pytest.mark.parametrize("allocation, fewest", [
    ([], "every set at its fewest channels"),
    (["prune.allocation=sensitivity", "prune.sensitivity_grid=[0.25,0.5]"],
     "every set pruned at prune.sensitivity_grid's largest ratio 0.5"),
])
def test_unreachable_target_is_refused_before_weights_and_statistics(tmp_path, monkeypatch, allocation, fewest):
    macs_clock(monkeypatch)
    exp = experiment(tmp_path, "prune.target_speedup=50", *SPEED[1:], *allocation)
    with pytest.raises(ValueError) as err:
        run_experiment(exp)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("prune.target_speedup=50 cannot be reached: the largest predicted speed-up is ")
    assert f"(torch, batch 4, 1 thread, {fewest}); accepted: up to " in message
    record = RunRecord.from_dict(json.loads((tmp_path / "run" / "metrics.json").read_text()))
    assert record.status == "failed" and not {"baseline", "collect", "score"} & set(record.timings_s)
    assert not (tmp_path / "cache" / "stats").exists()


@pytest.mark.slow
@pytest.mark.parametrize("scorer, recover", [("qsfm", "lstsq"), ("fpgm", "sequential recover.images=64")])
def test_speed_target_composes_with_the_sensitivity_allocation_scorers_and_recoveries(tmp_path, monkeypatch, scorer,
                                                                                       recover):
    macs_clock(monkeypatch)
    record = run_experiment(experiment(tmp_path, "prune=speed", *SPEED, f"scorer={scorer}", *f"recover={recover}".split(),
                                       "prune.sensitivity_grid=[0.25,0.5,0.75]", "prune.sensitivity_images=32",
                                       "eval.latency_batches=[]"))
    plan = record.results.plan
    assert plan["protocol"] == "target_speedup" and plan["predicted_speedup"] >= 1.3
    assert plan["sensitivity_fold"] == "lstsq" and record.cache["sensitivity"] == "miss"
    assert record.results.speed["measured_speedup"] > 0 and record.settings.recovery.startswith(recover.split()[0])
    assert record.results.kept_channels == {
        name: {"kept": plan["kept_widths"][name], "total": v["total"]} for name, v in record.results.kept_channels.items()}
