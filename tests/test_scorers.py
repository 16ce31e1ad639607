"""Scorers on hand-made inputs whose answers are worked out here."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from qsfm_cli import scoring
from qsfm_cli.app import config_dir
from qsfm_cli.collect import chip as chip_module
from qsfm_cli.collect.chip import channel_independence
from qsfm_cli.collect.rank import map_ranks
from qsfm_cli.scoring import StatRequest, get_scorer, list_scorers, qsfm_order, simscore_order, threshold_scorers
from qsfm_cli.scoring.base import checked_dead
from qsfm_cli.scoring.qsfm import qsfm_steps
from qsfm_cli.types import ChannelSet, LayerStats


def symmetric(c: int, upper: dict[tuple[int, int], float], fill: float = 0.0) -> torch.Tensor:
    s = torch.full((c, c), fill, dtype=torch.float64)
    for (i, j), v in upper.items():
        s[i, j] = s[j, i] = v
    s.fill_diagonal_(1.0)
    return s


def stats_for(S: torch.Tensor, dead: list[int] = (), key: str = "ssim") -> LayerStats:
    c = S.shape[0]
    dead_mask = torch.zeros(c, dtype=torch.bool)
    dead_mask[list(dead)] = True
    return LayerStats(num_images=4, dead=dead_mask, values={key: S}, counted={key: 4})


SET = ChannelSet("conv", 5, ("conv",), "next", True, ("next",))


# --- QSFM -------------------------------------------------------------------------------------------------

def test_qsfm_pair_tie_takes_smallest_pair_and_removes_the_more_redundant():
    # (0,1) and (0,3) tie at .8 -> (0,1). Mean S to others: ch0 (.8+.5+.8)/3 > ch1 (.8+.3+.2)/3 -> drop 0.
    # Left {1,2,3}: best (2,3)=.6; ch2 (.3+.6)/2 > ch3 (.2+.6)/2 -> drop 2. Left {1,3}: tie -> drop 3.
    S = symmetric(4, {(0, 1): .8, (0, 2): .5, (0, 3): .8, (1, 2): .3, (1, 3): .2, (2, 3): .6})
    assert qsfm_order(S) == ([0, 2, 3], [1, 3, 1])
    assert qsfm_steps(S)[2] == [.8, .6, .2]


def test_qsfm_pair_tie_is_lexicographic_on_the_first_index():
    # (0,3) and (1,2) tie at .75 -> (0,3); equal means -> drop 3 (twin 0); then (1,2): equal -> drop 2
    S = symmetric(4, {(1, 2): .75, (0, 3): .75}, fill=.125)
    assert qsfm_order(S) == ([3, 2, 1], [0, 1, 0])


def test_qsfm_dead_channels_first_and_out_of_every_mean():
    # channel 2 is dead: its .95 must neither win a pair nor enter a mean.
    # Left {0,1,3,4}: (0,1)=.9; sums ch0 .9+.5+.1 == ch1 .9+.1+.5 -> tie -> drop 1 (twin 0).
    # Left {0,3,4}: (0,3)=.5; ch0 (.5+.1)/2 < ch3 (.5+.4)/2 -> drop 3 (twin 0). Left {0,4}: drop 4.
    S = symmetric(5, {(0, 1): .9, (0, 3): .5, (0, 4): .1, (1, 3): .1, (1, 4): .5, (3, 4): .4,
                      (0, 2): .95, (1, 2): .95, (2, 3): .95, (2, 4): .95})
    assert qsfm_order(S, dead=[2]) == ([2, 1, 3, 4], [-1, 0, 0, 0])
    order = get_scorer("qsfm").score(nn.Identity(), [SET], {"conv": stats_for(S, [2])})["conv"]
    assert order.removal == [2, 1, 3, 4, 0]
    assert order.twins == [-1, 0, 0, 0, -1]
    assert order.values == [math.inf, .9, .5, .1, -math.inf]


def test_qsfm_threshold_values_are_the_largest_remaining_similarity():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(9, 9, generator=g, dtype=torch.float64)
    S = (a + a.T) / 2
    order, twins, values = qsfm_steps(S, dead=[4])
    remaining = set(range(9)) - {4}
    for removed, twin, value in zip(order[1:], twins[1:], values[1:]):
        best = max(S[i, j].item() for i in remaining for j in remaining if i < j)
        assert value == best and S[removed, twin].item() == best
        remaining.remove(removed)
    assert values == sorted(values, reverse=True) and len(order) == 8 and len(remaining) == 1


def test_qsfm_all_dead():
    assert qsfm_order(torch.eye(3), dead=[0, 1, 2]) == ([0, 1, 2], [-1, -1, -1])


# --- similarity score -------------------------------------------------------------------------------------

SIMSCORE_S = symmetric(5, {(0, 1): .25, (0, 2): .5, (0, 3): .75, (0, 4): .5, (1, 2): .5, (1, 3): .25,
                           (1, 4): 0.0, (2, 3): .5, (2, 4): .5, (3, 4): .5})
# scores: ch0 2/4 = .5, ch1 1/4 = .25, ch2 2/4 = .5, ch3 2/4 = .5, ch4 1.5/4 = .375


def test_simscore_descending_with_ties_larger_index_first():
    assert simscore_order(SIMSCORE_S) == ([3, 2, 0, 4, 1], [.5, .5, .5, .375, .25])


def test_simscore_dead_first_and_scorer_values():
    order = get_scorer("simscore").score(nn.Identity(), [SET], {"conv": stats_for(SIMSCORE_S, [1])})["conv"]
    assert order.removal == [1, 3, 2, 0, 4]
    assert order.values == [math.inf, .5, .5, .5, .375]
    assert order.twins is None


def test_similarity_scorers_read_the_metric_they_asked_for():
    scorer = get_scorer("simscore", metric="cosine")
    assert scorer.requests() == {StatRequest.similarity("cosine")}
    stats = {"conv": stats_for(SIMSCORE_S, key="cosine")}
    assert scorer.score(nn.Identity(), [SET], stats)["conv"].removal == [3, 2, 0, 4, 1]
    with pytest.raises(KeyError, match="no 'ssim' similarity collected"):
        get_scorer("simscore").score(nn.Identity(), [SET], stats)
    window7 = get_scorer("qsfm", window=7).requests().pop()
    assert window7.key == "ssim(k1=0.01,k2=0.03,window=7,sigma=1.5)"


# --- weight criteria --------------------------------------------------------------------------------------

class TwoProducers(nn.Module):
    """Two 1x1 convs whose 4 output channels form one set (as on a residual stream)."""

    def __init__(self, a: list[float], b: list[float]):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 1, bias=False)
        self.b = nn.Conv2d(1, 4, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor(a).view(4, 1, 1, 1))
            self.b.weight.copy_(torch.tensor(b).view(4, 1, 1, 1))


A, B = [1.0, -2.0, 0.5, 3.0], [2.0, 0.0, -0.25, -1.0]
ONE = ChannelSet("a", 4, ("a",), "x")
BOTH = ChannelSet("a", 4, ("a", "b"), "x")


def test_l1_sums_filters_across_producers():
    model = TwoProducers(A, B)
    assert get_scorer("l1").score(model, [ONE], {})["a"].removal == [2, 0, 1, 3]      # |A| = 1, 2, .5, 3
    assert get_scorer("l1").score(model, [BOTH], {})["a"].removal == [2, 1, 0, 3]     # 3, 2, .75, 4


def test_fpgm_removes_filters_nearest_the_others_first():
    model = TwoProducers(A, B)
    points = list(zip(A, B))
    total = [sum(math.dist(p, q) for q in points) for p in points]
    expected = sorted(range(4), key=lambda c: total[c])
    order = get_scorer("fpgm").score(model, [BOTH], {})["a"]
    assert order.removal == expected and order.values is None
    # scalar filters 1, -2, .5, 3: distance sums 5.5, 10.5, 6, 9.5
    assert get_scorer("fpgm").score(model, [ONE], {})["a"].removal == [0, 2, 3, 1]


def test_fpgm_identical_filters_tie_exactly():
    # 32 filters (cdist's matrix-product shortcut starts above 25) near a common offset, where
    # |a|^2 + |b|^2 - 2ab loses digits: filter 20 is a copy of filter 5, so both have the same distance
    # sum and tie (index order), which the shortcut's rounding would break (20 first, for this seed).
    g = torch.Generator().manual_seed(0)
    filters = torch.randn(32, 3, 3, 3, generator=g, dtype=torch.float64) * 0.1 + 3.0
    filters[20] = filters[5]
    conv = nn.Conv2d(3, 32, 3).double()
    with torch.no_grad():
        conv.weight.copy_(filters)
    model = nn.Sequential(conv)
    removal = get_scorer("fpgm").score(model, [ChannelSet("0", 32, ("0",), "x")], {})["0"].removal
    assert removal.index(20) == removal.index(5) + 1


def test_dead_indices_are_checked_in_one_place():
    assert checked_dead([3, 1, 3], 4) == [1, 3]
    message = r"dead channel indices must lie in \[0, 4\), got \[1, 4\]"
    with pytest.raises(ValueError, match=message):
        checked_dead([4, 1], 4)
    for order in (qsfm_order, simscore_order):
        with pytest.raises(ValueError, match=message):
            order(torch.eye(4), [4, 1])


def test_threshold_rule_is_declared_by_each_scorer():
    assert {name: get_scorer(name).threshold_rule for name in list_scorers()} == {
        "chip": False, "fpgm": False, "hrank": False, "l1": False, "qsfm": True, "random": False,
        "simscore": True}
    assert threshold_scorers() == ["qsfm", "simscore"]

    class Valued:                                 # a newly registered scorer with a threshold rule
        name, threshold_rule = "valued", True

    with scoring.SCORERS.scratch():
        scoring.register_scorer(Valued)
        assert threshold_scorers() == ["qsfm", "simscore", "valued"]


def test_producer_of_the_wrong_width_is_named():
    with pytest.raises(ValueError, match="producer 'a' of channel set 'a' has 4 output channels, the set has 5"):
        get_scorer("l1").score(TwoProducers(A, B), [ChannelSet("a", 5, ("a",), "x")], {})


# --- map criteria -----------------------------------------------------------------------------------------

def test_map_ranks_are_matrix_ranks():
    g = torch.Generator().manual_seed(0)
    ranks = [0, 1, 3, 2]
    maps = torch.stack([torch.stack([
        sum((torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g) for _ in range(r)),
            torch.zeros(8, 8)) for r in ranks]) for _ in range(3)])
    assert map_ranks(maps).tolist() == [ranks] * 3
    stats = {"a": LayerStats(3, torch.zeros(4, dtype=torch.bool), {"rank": map_ranks(maps).double().mean(0)})}
    assert get_scorer("hrank").score(nn.Identity(), [ONE], stats)["a"].removal == [0, 1, 3, 2]


@pytest.mark.parametrize("side", [(6, 7), (2, 2)])          # HW >= C and HW < C
def test_channel_independence_is_the_nuclear_norm_difference(side, monkeypatch):
    g = torch.Generator().manual_seed(1)
    maps = torch.relu(torch.randn(3, 5, *side, generator=g))
    maps[:, 3] = maps[:, 0] * 2           # a channel fully explained by another: CI tiny
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for n in range(3):
        a = maps[n].reshape(5, -1).double()
        for c in range(5):
            without = a.clone()
            without[c] = 0
            expected[n, c] = torch.linalg.matrix_norm(a, "nuc") - torch.linalg.matrix_norm(without, "nuc")
    torch.testing.assert_close(channel_independence(maps), expected, atol=1e-9, rtol=1e-9)
    monkeypatch.setattr(chip_module, "_SVD_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(channel_independence(maps), expected, atol=1e-9, rtol=1e-9)
    stats = {"conv": LayerStats(3, torch.zeros(5, dtype=torch.bool), {"chip": expected.mean(0)})}
    assert get_scorer("chip").score(nn.Identity(), [SET], stats)["conv"].removal == \
        expected.mean(0).argsort(stable=True).tolist()


def test_missing_statistic_is_named():
    with pytest.raises(KeyError, match="no 'rank' statistic collected for 'conv'"):
        get_scorer("hrank").score(nn.Identity(), [SET], {"conv": stats_for(SIMSCORE_S)})


# --- random and the registry ------------------------------------------------------------------------------

def test_random_is_seed_repeatable_and_per_set():
    sets = [ChannelSet(f"s{k}", 32, (f"s{k}",), "x") for k in range(2)]
    first = get_scorer("random", seed=7).score(nn.Identity(), sets, {})
    again = get_scorer("random", seed=7).score(nn.Identity(), sets[::-1], {})
    other = get_scorer("random", seed=8).score(nn.Identity(), sets, {})
    assert {k: v.removal for k, v in first.items()} == {k: v.removal for k, v in again.items()}
    assert first["s0"].removal != other["s0"].removal
    assert first["s0"].removal != first["s1"].removal
    assert sorted(first["s0"].removal) == list(range(32))


def test_registry_names_and_errors():
    assert list_scorers() == ["chip", "fpgm", "hrank", "l1", "qsfm", "random", "simscore"]
    with pytest.raises(ValueError, match="^scorer.name=x; accepted: chip, fpgm, hrank, l1, qsfm, random, "
                                         "simscore$"):
        get_scorer("x")
    with pytest.raises(ValueError, match="^scorer.seed=1; accepted: scorer.metric, scorer.k1"):
        get_scorer("qsfm", seed=1)
    with pytest.raises(ValueError, match="^scorer.metric=l2; accepted: "):
        get_scorer("simscore", metric="l2")


def test_requests_and_options():
    assert get_scorer("l1").requests() == set() == get_scorer("random").requests()
    assert get_scorer("hrank").requests() == {StatRequest.rank()}
    assert get_scorer("chip").requests() == {StatRequest.chip()}
    assert get_scorer("qsfm").options() == {"metric": "ssim", "k1": 0.01, "k2": 0.03, "window": 11, "sigma": 1.5}
    assert get_scorer("random", seed=3).options() == {"seed": 3}
    # cosine ignores the SSIM constants, so both scorers share one collected matrix
    assert get_scorer("qsfm", metric="cosine", k1=0.5).requests() == get_scorer("simscore", metric="cosine").requests()
    with pytest.raises(ValueError, match="^statistic=foo; accepted: "):
        StatRequest("foo")


@pytest.mark.parametrize("name", list_scorers())
def test_every_scorer_has_a_config_listing_all_its_options(name):
    # The composed run config (the option extends its schema), where `seed: ${seed}` (random) finds the seed.
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"scorer={name}"]).scorer
    scorer = instantiate(cfg)
    assert scorer.name == name
    assert scorer.options() == get_scorer(name).options()
    assert set(cfg) - {"_target_", "name"} == set(scorer.options())
    overrides = {k: v for k, v in {"metric": "cosine", "seed": 5}.items() if k in cfg}
    cfg.update(overrides)                       # what `scorer.metric=cosine` does on the command line
    assert {k: instantiate(cfg).options()[k] for k in overrides} == overrides
