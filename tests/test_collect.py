"""The streaming collector against statistics computed directly on all maps at once."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsfm_cli.collect import MeanStatistic, StatRequest, collect_stats, get_statistic, list_statistics, \
    register_statistic
from qsfm_cli.collect import base as collect_base
from qsfm_cli.data import load_dataset
from qsfm_cli.loaders import DeviceLoader
from qsfm_cli.models import create_model
from qsfm_cli.collect.chip import channel_independence
from qsfm_cli.collect.rank import map_ranks
from qsfm_cli.scoring import get_scorer, list_scorers, similarity_matrix
from qsfm_cli.types import ChannelSet

# Requests of the statistics that take options; every other statistic is asked for as StatRequest(kind).
WITH_OPTIONS = {"similarity": [StatRequest.similarity(m) for m in ("ssim", "cosine", "pearson")]}


def requests_of(kind: str) -> list[StatRequest]:
    return WITH_OPTIONS.get(kind) or [StatRequest(kind)]


ALL = {r for kind in list_statistics() for r in requests_of(kind)}


class Tiny(nn.Module):
    """16x16 maps into conv2 (SSIM windows), 8x8 into conv3 (one window), a ReLU module's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(5, 4, 3, padding=1)
        self.act3 = nn.ReLU()
        self.head = nn.Linear(4, 3)
        with torch.no_grad():              # channel 0 of conv1: relu(bn(0) - .5) = 0 on every image
            self.conv1.weight[0] = 0
            self.conv1.bias[0] = 0
            self.bn1.bias[0] = -0.5

    def forward(self, x):
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        x = self.act3(self.conv3(F.relu(x)))
        return self.head(x.mean((2, 3)))


SETS = [
    ChannelSet("conv1", 6, ("conv1",), "conv2", True, ("conv2",)),
    ChannelSet("conv2", 5, ("conv2",), "conv3", True, ("conv3",)),
    ChannelSet("conv3", 4, ("conv3",), "act3", False),
]


@pytest.fixture(scope="module")
def images():
    return load_dataset("fake", size=16, train_size=40, seed=1)[0]


def direct_maps(model: nn.Module, sets: list[ChannelSet], images) -> dict[str, torch.Tensor]:
    """Every set's maps for all images, by a plain forward pass over the whole set."""
    maps = {}
    handles = []
    for cs in sets:
        module = model.get_submodule(cs.tap)
        if cs.tap_input:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=cs.name: maps.__setitem__(n, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, n=cs.name: maps.__setitem__(n, o)))
    model.eval()
    with torch.no_grad():
        model(next(iter(DeviceLoader(images, len(images))))[0])
    for h in handles:
        h.remove()
    return maps


def test_streamed_statistics_equal_the_direct_ones(images):
    model = Tiny()
    stats = collect_stats(model, SETS, images, ALL, batch_size=16)      # 16 + 16 + 8 images
    maps = direct_maps(model, SETS, images)
    for cs in SETS:
        layer, m = stats[cs.name], maps[cs.name]
        assert layer.num_images == 40
        for metric in ("ssim", "cosine", "pearson"):
            torch.testing.assert_close(layer.values[metric], similarity_matrix(m, metric), atol=1e-6, rtol=0)
            assert layer.counted[metric] == 40
        flat = m.flatten(2).double()
        torch.testing.assert_close(layer.values["mean"], flat.mean((0, 2)))
        torch.testing.assert_close(layer.values["gram"],
                                   torch.einsum("nip,njp->ij", flat, flat) / (40 * flat.shape[2]), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(layer.values["rank"], map_ranks(m).double().mean(0))
        torch.testing.assert_close(layer.values["chip"], channel_independence(m).mean(0))
    assert stats["conv1"].dead.tolist() == [True] + [False] * 5
    assert not stats["conv3"].dead[1:].any()


@pytest.mark.parametrize("kind", list_statistics())
def test_every_statistic_streams_to_what_one_batch_gives(kind, images):
    """Batches of 7 (the last one short) and one batch of all images give the same values and counts."""
    requests = set(requests_of(kind))
    streamed = collect_stats(Tiny(), SETS, images, requests, batch_size=7)
    whole = collect_stats(Tiny(), SETS, images, requests, batch_size=len(images))
    for cs in SETS:
        assert streamed[cs.name].values.keys() == whole[cs.name].values.keys()
        assert streamed[cs.name].counted == whole[cs.name].counted
        assert torch.equal(streamed[cs.name].dead, whole[cs.name].dead)
        for name, value in whole[cs.name].values.items():
            assert value.device.type == "cpu"
            torch.testing.assert_close(streamed[cs.name].values[name], value, rtol=1e-6, atol=1e-6)


def test_only_requested_statistics_are_gathered(images):
    stats = collect_stats(Tiny(), SETS[:1], images, set(), batch_size=32)["conv1"]
    assert stats.values == {} and stats.counted == {}
    assert stats.dead.tolist() == [True] + [False] * 5


def test_hooks_removed_and_training_mode_restored(images):
    model = Tiny().train()
    collect_stats(model, SETS, images, {StatRequest.similarity()}, batch_size=32)
    assert model.training
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_resnet_block_internal_maps_are_what_conv2_reads(images):
    model = create_model("resnet20").eval()
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    sets = [ChannelSet(f"{blk}.conv1", model.get_submodule(f"{blk}.conv1").out_channels, (f"{blk}.conv1",),
                       f"{blk}.conv2", True, (f"{blk}.conv2",)) for blk in blocks]
    stats = collect_stats(model, sets, images.subset(range(8)), {StatRequest.moments()}, batch_size=8)
    inputs = {}
    block = model.get_submodule("layer2.1")
    handle = block.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0]))
    with torch.no_grad():
        model(next(iter(DeviceLoader(images.subset(range(8)), 8)))[0])
    handle.remove()
    expected = F.relu(block.bn1(block.conv1(inputs["x"]))).double().mean((0, 2, 3))
    torch.testing.assert_close(stats["layer2.1.conv1"].values["mean"], expected)
    assert [stats[cs.name].values["gram"].shape[0] for cs in sets] == [16] * 3 + [32] * 3 + [64] * 3


def test_same_inputs_give_the_same_orders(images):
    """Acceptance 3 at the library level: the same images and options give identical removal orders."""
    scorers = [get_scorer(name) for name in list_scorers()]
    requests = set().union(*(s.requests() for s in scorers))
    runs = []
    for _ in range(2):
        model = Tiny()
        stats = collect_stats(model, SETS, images.sample(24, seed=5), requests, batch_size=10)
        runs.append({s.name: {k: (o.removal, o.values, o.twins) for k, o in s.score(model, SETS, stats).items()}
                     for s in scorers})
    assert runs[0] == runs[1]
    for name, orders in runs[0].items():
        for cs in SETS:
            assert sorted(orders[cs.name][0]) == list(range(cs.size)), name


def test_bad_channel_sets_are_named(images):
    with pytest.raises(ValueError, match="tap 'nope' is not a module"):
        collect_stats(Tiny(), [ChannelSet("conv1", 6, ("conv1",), "nope")], images, set())
    with pytest.raises(ValueError, match="channel set 'conv1' has 7 channels but its tap 'conv2'"):
        collect_stats(Tiny(), [ChannelSet("conv1", 7, ("conv1",), "conv2")], images, set())


class Twice(nn.Module):
    """One ReLU module applied twice per forward (as in torchvision's BasicBlock)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.off_path = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.relu(self.relu(self.conv(x)) - 1)


def test_a_tap_must_run_exactly_once_per_forward(images):
    relu = ChannelSet("conv", 4, ("conv",), "relu", False)
    with pytest.raises(ValueError, match="tap 'relu' of channel set 'conv' saw 80 maps for 40 images"):
        collect_stats(Twice(), [relu], images, set())
    with pytest.raises(ValueError, match="saw 0 maps for 40 images"):
        collect_stats(Twice(), [ChannelSet("conv", 4, ("conv",), "off_path")], images, set())


class PeakStatistic(MeanStatistic):
    """A statistic defined outside the package: the mean over images of each map's largest value."""

    kind = "peak"

    def batch_sums(self, maps):
        return {"peak": maps.flatten(2).amax(2).double().sum(0)}, len(maps)


@pytest.fixture
def peak():
    with collect_base.STATISTICS.scratch():
        yield register_statistic(PeakStatistic)


def test_a_registered_statistic_is_collected_and_validated(images, peak):
    assert "peak" in list_statistics() and get_statistic("peak") is PeakStatistic
    stats = collect_stats(Tiny(), SETS, images, {StatRequest("peak")}, batch_size=16)
    maps = direct_maps(Tiny(), SETS, images)
    for cs in SETS:
        torch.testing.assert_close(stats[cs.name].values["peak"], maps[cs.name].flatten(2).amax(2).double().mean(0))
        assert stats[cs.name].counted == {"peak": 40}
    with pytest.raises(ValueError, match="statistic 'peak' takes no metric or params, got metric='ssim'"):
        StatRequest("peak", "ssim")


def test_a_second_registration_under_one_name_warns(peak):
    with pytest.warns(UserWarning, match="statistic 'peak' registered twice"):
        register_statistic(type("OtherPeak", (PeakStatistic,), {}))


def test_two_statistics_yielding_one_value_name_are_refused(images, peak, monkeypatch):
    monkeypatch.setattr(PeakStatistic, "batch_sums", lambda self, maps: ({"mean": maps.new_zeros(4)}, len(maps)))
    with pytest.raises(ValueError, match="both yield a value named 'mean'"):
        collect_stats(Tiny(), SETS[2:], images, {StatRequest("peak"), StatRequest.moments()})


def test_requests_are_checked_against_the_registry():
    with pytest.raises(ValueError, match=f"^statistic=foo; accepted: {', '.join(list_statistics())}$"):
        StatRequest("foo")
    with pytest.raises(ValueError, match="statistic 'rank' takes no metric or params"):
        StatRequest("rank", params=(("window", 3),))
    with pytest.raises(ValueError, match="^scorer.metric=l2; accepted: ssim, cosine, pearson$"):
        StatRequest("similarity", "l2")
    with pytest.raises(ValueError, match="similarity 'ssim' takes params k1, k2, sigma, window, got none"):
        StatRequest("similarity", "ssim")
    with pytest.raises(ValueError, match="^scorer.window=2.5; accepted: a positive integer$"):
        StatRequest.similarity("ssim", window=2.5)
    assert StatRequest.similarity("cosine", k1=0.5) == StatRequest("similarity", "cosine")
    assert StatRequest.similarity("ssim", k1=1) == StatRequest.similarity("ssim", k1=1.0)
    assert repr(StatRequest.similarity("ssim", k1=1)) == repr(StatRequest.similarity("ssim", k1=1.0))
