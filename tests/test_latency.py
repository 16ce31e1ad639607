"""Paired latency: structure, interleaving and the trusted flag, on injected timings (no timed thresholds)."""
import pytest
import torch

from qsfm_cli.data import load_dataset
from qsfm_cli.evaluate import evaluate_pair, latency_pairs
from qsfm_cli.latency import (MAX_SPREAD, PairLatency, format_pairs, interleaved_times, measure_pair, spread,
                              summarize_pair)
from qsfm_cli.models import create_model
from qsfm_cli.pruning import apply_keep, channel_sets


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base = create_model("resnet8", stage_widths=[4, 8, 16]).eval()
    x = torch.zeros(1, 3, 32, 32)
    keep = {s.name: list(range(s.size // 2)) for s in channel_sets(base, x)}
    return base, apply_keep(base, keep, x).eval()


def test_spread_is_iqr_over_median():
    assert spread([5.0] * 6) == 0.0
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)
    assert spread([10.0, 10.0, 10.0, 10.0, 1000.0]) == 0.0       # one outlier does not move the quartiles


def test_trusted_only_when_both_spreads_are_within_the_limit():
    quiet_base, quiet_pruned = [10.0, 10.1, 9.9, 10.0, 10.2], [5.0, 5.1, 4.9, 5.0, 5.05]
    noisy = [5.0, 1.0, 9.0, 2.0, 7.0]
    ok = summarize_pair(quiet_base, quiet_pruned, runtime="torch", batch=64)
    assert ok.trusted and ok.speedup == pytest.approx(10.0 / 5.0)
    assert (ok.base_ms, ok.pruned_ms, ok.repeats) == (10.0, 5.0, 5)
    for base, pruned in ((quiet_base, noisy), (noisy, quiet_pruned)):
        bad = summarize_pair(base, pruned, runtime="torch", batch=64)
        assert not bad.trusted and max(bad.base_spread, bad.pruned_spread) > MAX_SPREAD
    # The limit is the caller's: the same timings pass a looser one.
    loose = summarize_pair(quiet_base, noisy, runtime="torch", batch=64, max_spread=10.0)
    assert loose.trusted and loose.max_spread == 10.0


def test_runs_alternate_after_warm_up_and_each_gets_its_own_times():
    now, calls = [0.0], []

    def run(name, seconds):
        def call():
            calls.append(name)
            now[0] += seconds
        return call

    base_ms, pruned_ms = interleaved_times([run("A", 0.004), run("B", 0.001)], 4, warmup=2, min_warmup_s=0,
                                           clock=lambda: now[0])
    assert calls == ["A", "B"] * 2 + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert base_ms == pytest.approx([4.0] * 4) and pruned_ms == pytest.approx([1.0] * 4)


def test_warm_up_lasts_at_least_the_given_time():
    now, calls = [0.0], []

    def call():
        calls.append(1)
        now[0] += 0.1

    interleaved_times([call], 5, warmup=1, min_warmup_s=1.0, clock=lambda: now[0])
    assert len(calls) - 5 >= 10          # 1 s of warm-up at 0.1 s per call


@pytest.mark.parametrize("runtime", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_measure_pair_reports_every_batch(pair, runtime):
    threads = torch.get_num_threads()
    results = measure_pair(*pair, [1, 3], runtime=runtime, repeats=5, warmup=1, min_warmup_s=0, threads=1)
    assert torch.get_num_threads() == threads                     # restored after the measurement
    assert [(r.runtime, r.batch, r.threads, r.repeats) for r in results] == [(runtime, 1, 1, 5),
                                                                             (runtime, 3, 1, 5)]
    for r in results:
        assert r.base_ms > 0 and r.pruned_ms > 0 and r.base_spread >= 0 and r.pruned_spread >= 0
        assert r.speedup == pytest.approx(r.base_ms / r.pruned_ms)
        assert r.trusted == (max(r.base_spread, r.pruned_spread) <= r.max_spread)


@pytest.mark.parametrize("kwargs, message", [
    ({"runtime": "tensorrt"}, "latency runtime 'tensorrt'; accepted: torch, onnxruntime"),
    ({"repeats": 2}, "latency repeats must be >= 3; got 2"),
    ({"batches": [0]}, r"latency batches must be integers >= 1; got \[0\]"),
    ({"threads": 0}, "latency threads must be >= 1 or None; got 0"),
])
def test_bad_settings_fail_before_any_work(pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_pair(*pair, **kwargs)


def test_untrusted_speedups_are_marked_not_reported():
    trusted = PairLatency("torch", 1, None, 2.0, 1.0, 0.05, 0.04, 2.0, True, MAX_SPREAD, 20)
    untrusted = PairLatency("onnxruntime", 64, 4, 430.7, 1.0, 0.9, 0.04, 430.7, False, MAX_SPREAD, 20)
    assert trusted.speedup_text() == "2.00" and untrusted.speedup_text() == "(430.70)?"
    table = format_pairs([trusted, untrusted])
    assert "(430.70)?" in table and "untrusted" in table.splitlines()[-1]
    assert "untrusted" not in format_pairs([trusted])


def test_evaluate_pair_fills_each_models_latency_from_one_paired_measurement(pair):
    _, test = load_dataset("fake", train_size=8, test_size=16)
    base_m, pruned_m, pairs = evaluate_pair(*pair, test, latency_batches=(2,), latency_repeats=5)
    [p] = pairs
    assert base_m.latency_ms == {"b2": p.base_ms} and pruned_m.latency_ms == {"b2": p.pruned_ms}
    assert pruned_m.macs < base_m.macs and 0 <= pruned_m.top1 <= 100
    with pytest.raises(ValueError, match=r"latency runtimes \['torch', 'trt'\]"):
        evaluate_pair(*pair, test, runtimes=("torch", "trt"))


@pytest.mark.slow
def test_a_pair_of_architectures_is_timed_once_per_machine_and_settings(tmp_path, monkeypatch):
    from qsfm_cli import evaluate
    from qsfm_cli.cache import Cache

    timed = []
    real = evaluate.measure_pair

    def counting(base, pruned, batches, **kwargs):
        timed.append((tuple(batches), kwargs["threads"]))
        return real(base, pruned, batches, **kwargs)

    monkeypatch.setattr(evaluate, "measure_pair", counting)
    cache = Cache(tmp_path / "cache")

    def pairs(seed: int, threads: int | None = None):
        torch.manual_seed(seed)                  # other weights, the same architectures
        base, pruned = create_model("resnet8"), create_model("resnet8", stage_widths=(2, 4, 8))
        return latency_pairs(base, pruned, (16, 16), device="cpu", batches=(1, 2), repeats=3,
                             runtimes=("torch",), threads=threads, cache=cache)

    first = pairs(0)
    assert pairs(1) == first and len(timed) == 1          # read back, not timed again
    pairs(1, threads=1)                                   # other threads: timed
    assert timed == [((1, 2), None), ((1, 2), 1)]
