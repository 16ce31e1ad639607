"""Compensation folds removed channels into their consumers; BatchNorm recalibration re-estimates stats."""
import copy

import pytest
import torch
from torch import nn

from qsfm_cli.recover import recalibrate_bn
from qsfm_cli.recover.compensate import compensate
from qsfm_cli.data import ImageSet
from qsfm_cli.models import create_model
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.types import LayerStats, Order, SetStatus


def producer_consumer(padding: int, consumer_bias: bool) -> nn.Module:
    """conv 1x1 (3 -> 5) producing the set, conv 3x3 (5 -> 4) reading it, BatchNorm. Map 3 is an exact
    affine copy of map 1 (F3 = 2 F1 + 0.5), map 1 one of map 0 (F1 = F0 + 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.Conv2d(5, 4, 3, padding=padding, bias=consumer_bias),
                          nn.BatchNorm2d(4))
    with torch.no_grad():
        w, b = model[0].weight, model[0].bias
        w[1], b[1] = w[0], b[0] + 1
        w[3], b[3] = 2 * w[1], 2 * b[1] + 0.5
        bn = model[2]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()


def moments(model: nn.Module, s, x: torch.Tensor) -> LayerStats:
    maps = []
    handle = model.get_submodule(s.tap).register_forward_pre_hook(lambda _m, inp: maps.append(inp[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    f = maps[0].double().transpose(0, 1).reshape(s.size, -1)   # [C, images * pixels]
    return LayerStats(num_images=len(x), dead=torch.zeros(s.size, dtype=torch.bool),
                      values={"mean": f.mean(1), "gram": f @ f.T / f.shape[1]})


def output_error(model, x, keep, mode, order, ridge=1e-3):
    """Relative RMS error of the pruned model's output, and the compensation status."""
    with torch.no_grad():
        reference = model(x)
    work = copy.deepcopy(model)
    s = channel_sets(work, x)[0]
    status = compensate(work, [s], {s.name: moments(model, s, x)}, {s.name: order}, keep, mode,
                        ridge=ridge) if mode else {}
    pruned = apply_keep(work, keep, x)
    with torch.no_grad():
        return ((pruned(x) - reference).norm() / reference.norm()).item(), status


@pytest.mark.parametrize("consumer_bias", [False, True])
def test_affine_copies_are_folded_exactly(consumer_bias):
    model = producer_consumer(padding=0, consumer_bias=consumer_bias)
    x = torch.randn(8, 3, 12, 12)
    s = channel_sets(model, x)[0]
    assert (s.name, s.consumers, s.consumer_norms) == ("0", ("1",), ("2",))
    keep = {"0": [0, 2, 4]}                      # removes 3 (copy of 1) and then 1 (copy of 0)
    twins = Order(removal=[3, 1, 0, 2, 4], twins=[1, 0, -1, -1, -1])
    plain, _ = output_error(model, x, keep, None, twins)
    twin, status = output_error(model, x, keep, "twin", twins)
    lstsq, _ = output_error(model, x, keep, "lstsq", twins)
    assert status == {"0": SetStatus(True, "compensated")}
    assert plain > 0.1 and twin < 1e-5 and lstsq < 1e-3


def test_compensation_reduces_the_error_with_zero_padding():
    model = producer_consumer(padding=1, consumer_bias=False)
    x = torch.randn(8, 3, 12, 12)
    keep = {"0": [0, 1, 2, 4]}
    order = Order(removal=[3, 0, 1, 2, 4], twins=[1, -1, -1, -1, -1])
    plain, _ = output_error(model, x, keep, None, order)
    for mode in ("twin", "lstsq"):
        error, _ = output_error(model, x, keep, mode, order)
        assert error < 0.25 * plain   # exact inside, the constant is off only along the border


def test_lstsq_never_increases_the_mean_squared_error():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(16, 3, 8, 8)
    keep = {"0": [0, 1, 2, 3]}
    order = Order(removal=[4, 5, 0, 1, 2, 3])
    plain, _ = output_error(model, x, keep, None, order)
    lstsq, _ = output_error(model, x, keep, "lstsq", order)
    # The residual's second moment is below the removed maps' own in PSD order: per output channel, the
    # squared error on the fitted data can only shrink.
    assert lstsq <= plain * 1.001


def test_sets_without_plain_consumers_are_skipped_and_said_so():
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    sets = channel_sets(model, x, "stage")
    stream = next(s for s in sets if s.name == "layer2.0.conv2")
    inner = next(s for s in sets if s.name == "layer2.0.conv1")
    stats = {s.name: LayerStats(2, torch.zeros(s.size, dtype=torch.bool),
                                values={"mean": torch.zeros(s.size), "gram": torch.eye(s.size)})
             for s in (stream, inner)}
    orders = {s.name: Order(removal=list(range(s.size))) for s in (stream, inner)}
    keep = {"layer2.0.conv2": list(range(16)), "layer2.0.conv1": list(range(16))}
    before = model.layer2[0].conv2.weight.clone()
    status = compensate(model, [stream, inner], stats, orders, keep, "twin")
    assert str(status["layer2.0.conv2"]).startswith("skipped: its map is not read by plain conv/linear layers")
    assert str(status["layer2.0.conv1"]).startswith("skipped: the scorer pairs no twins") and "lstsq" in \
        status["layer2.0.conv1"].what
    assert torch.equal(model.layer2[0].conv2.weight, before)
    status = compensate(model, [inner], stats, orders, keep, "lstsq")
    assert status == {"layer2.0.conv1": SetStatus(True, "compensated")}
    with pytest.raises(ValueError, match="^recover.name=twins; accepted: twin, lstsq$"):
        compensate(model, [inner], stats, orders, keep, "twins")


def test_vgg_last_conv_folds_into_the_classifier():
    model = create_model("vgg16_bn").eval()
    x = torch.randn(4, 3, 32, 32)
    last = channel_sets(model, x)[-1]
    assert (last.tap, last.consumers) == ("pool", ("classifier.linear1",))
    mean = torch.rand(last.size, dtype=torch.float64)
    stats = {last.name: LayerStats(4, torch.zeros(last.size, dtype=torch.bool), values={
        "mean": mean, "gram": torch.outer(mean, mean) + torch.eye(last.size, dtype=torch.float64)})}
    bias = model.classifier.linear1.bias.clone()
    status = compensate(model, [last], stats, {last.name: Order(list(range(last.size)))},
                        {last.name: list(range(256))}, "lstsq")
    assert status == {last.name: SetStatus(True, "compensated")}
    assert not torch.equal(bias, model.classifier.linear1.bias)


def test_bn_recalibration_estimates_the_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.LazyLinear(2))
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    ds = ImageSet(images, torch.zeros(50, dtype=torch.long), 2, (0.5,) * 3, (0.25,) * 3)
    model(torch.zeros(1, 3, 8, 8))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    recalibrate_bn(model, ds, 48, batch_size=16, seed=3)    # three full batches: equal weights
    x = (ds.sample(48, seed=3).images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        z = model[0](x)
    assert torch.allclose(model[1].running_mean, z.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(model[1].running_var, z.var((0, 2, 3)), rtol=0.05)   # per-batch unbiased variances
    assert not model.training and model[1].momentum == 0.1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize("constant", [0.0, 0.5])
def test_lstsq_without_ridge_folds_exactly_next_to_a_dead_kept_channel(constant):
    model = producer_consumer(padding=0, consumer_bias=False)
    with torch.no_grad():                         # kept map 2 is constant: an exactly singular covariance
        model[0].weight[2].zero_()
        model[0].bias[2] = constant
    x = torch.randn(8, 3, 12, 12)
    keep = {"0": [0, 2, 4]}
    order = Order(removal=[3, 1, 0, 2, 4])
    plain, _ = output_error(model, x, keep, None, order)
    exact, status = output_error(model, x, keep, "lstsq", order, ridge=0.0)
    assert status == {"0": SetStatus(True, "compensated")} and plain > 0.1 and exact < 1e-5
    s = channel_sets(model, x)[0]
    with pytest.raises(ValueError, match=r"^recover.ridge=-0.1; accepted: >= 0 \(0: plain least squares\)$"):
        compensate(model, [s], {s.name: moments(model, s, x)}, {s.name: order}, keep, "lstsq", ridge=-0.1)


def bn_probe(n: int) -> tuple[nn.Module, ImageSet]:
    """conv -> BatchNorm2d -> pool -> BatchNorm1d (which cannot take a batch of one image in training mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.BatchNorm1d(4))
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    return model, ImageSet(images, torch.zeros(n, dtype=torch.long), 2, (0.5,) * 3, (0.25,) * 3)


def test_bn_recalibration_keeps_an_incomplete_last_batch():
    model, ds = bn_probe(100)
    recalibrate_bn(model, ds, 100, batch_size=64, seed=1)
    x = (ds.sample(100, seed=1).images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        z = model[0](x)
    # a cumulative average of the two batches' means (64 and 36 images), so all 100 images count
    expected = (z[:64].mean((0, 2, 3)) + z[64:].mean((0, 2, 3))) / 2
    assert int(model[1].num_batches_tracked) == 2
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)


def test_bn_recalibration_drops_only_a_last_batch_of_one_image():
    model, ds = bn_probe(65)
    recalibrate_bn(model, ds, 65, batch_size=64, seed=1)   # a batch of 1 would fail in BatchNorm1d
    x = (ds.sample(65, seed=1).images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        z = model[0](x[:64])
    assert int(model[1].num_batches_tracked) == 1
    assert torch.allclose(model[1].running_mean, z.mean((0, 2, 3)), atol=1e-5)
