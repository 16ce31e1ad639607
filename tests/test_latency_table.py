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


def sensitivity_table(sets):
    return {"grid": [0.25, 0.5, 0.75], "base_loss": 1.0, "min_channels": 1, "round_to": 1,
            "layers": {s.name: {"removed": [], "macs_saved": [],
                                "loss_increase": [0.01 * (i + 1), 0.05 * (i + 1), 0.2 * (i + 1)]}
                       for i, s in enumerate(sets)}}


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_a_plan_meets_its_predicted_target(macs_table, tiny, allocation):
    model, sets = tiny
    spec = PlanSpec(target_speedup=1.8, allocation=allocation, latency_runtime="torch", latency_batch=2)
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
         "prune.latency_repeats=3")


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


def test_unreachable_target_is_refused_before_weights_and_statistics(tmp_path, monkeypatch):
    macs_clock(monkeypatch)
    exp = experiment(tmp_path, "prune.target_speedup=50", *SPEED[1:])
    with pytest.raises(ValueError) as err:
        run_experiment(exp)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("prune.target_speedup=50 cannot be reached: the largest predicted speed-up is ")
    assert "(torch, batch 4, 1 thread, every set at its fewest channels); accepted: up to " in message
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
