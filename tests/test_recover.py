"""Sequential and blockwise reconstruction: exact where the removed maps are redundant, better than the
one-shot least squares where errors accumulate, and usable on every architecture the project prunes."""
import copy

import pytest
import torch
from torch import nn

from qsfm_cli.collect import collect_stats
from qsfm_cli.data import ImageSet
from qsfm_cli.models import create_model, list_models
from qsfm_cli.plan import PlanSpec, make_keep
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.recover import get_recovery, recalibrate_bn
from qsfm_cli.recover.blockwise import block_error
from qsfm_cli.recover.compensate import compensate
from qsfm_cli.recover.distill import distill
from qsfm_cli.recover.sequential import Block
from qsfm_cli.scoring import get_scorer
from qsfm_cli.scoring.base import StatRequest
from qsfm_cli.types import Order, SetStatus

TINY = {
    **{f"resnet{d}": {"stage_widths": (4, 8, 16)} for d in (8, 20, 32, 44, 56, 110)},
    "vgg16_bn": {"cfg": [8, 8, "M", 16, 16, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32], "hidden": 32},
    "mobilenetv2": {"stem": 8, "head": 32,
                    "hidden_widths": [8, 24, 24, 24, 24, 24, 24, 48, 48, 48, 48, 72, 72, 72, 120, 120, 120],
                    "out_widths": [4, 6, 6, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 40, 40, 40, 80]},
}


def images(n: int, size: int = 32, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                    torch.zeros(n, dtype=torch.long), 10, (0.5,) * 3, (0.25,) * 3)


def calibrated(model: nn.Module, data: ImageSet) -> nn.Module:
    """Untrained weights with BatchNorm statistics of the data: activations keep a sane scale in depth."""
    torch.manual_seed(0)
    return recalibrate_bn(model, data, len(data), batch_size=len(data)).eval()


def half_keep(model: nn.Module, x: torch.Tensor, scope: str = "default"):
    sets = channel_sets(model, x, scope)
    keep, _ = make_keep(get_scorer("l1").score(model, sets, {}), sets, PlanSpec(ratio=0.5))
    return sets, keep


def as_float(data: ImageSet) -> torch.Tensor:
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    return (data.images.float() / 255 - mean) / std


def relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = reference(x)
        return ((model(x) - want).norm() / want.norm()).item()


def test_sequential_reproduces_a_layer_exactly_when_removed_maps_are_combinations_of_kept_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 1, bias=False), nn.Conv2d(5, 4, 3, padding=1, bias=False),
                          nn.BatchNorm2d(4))
    with torch.no_grad():
        w = model[0].weight
        w[3] = w[0] - 2 * w[1]
        w[4] = 0.5 * w[2] + w[1]
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.5, 2)
    model.eval()
    data = images(16, size=10)
    x = as_float(data)
    sets = channel_sets(model, x[:1])
    keep = {"0": [0, 1, 2]}
    pruned = apply_keep(model, keep, x[:1])
    before = relative_error(pruned, model, x)
    recovery = get_recovery("sequential", ridge=0.0, positions=0).method
    status = recovery.refit(model, pruned, sets, keep, data, seed=0)
    assert status == {"0": SetStatus(True, "refit")}
    assert before > 0.1 and relative_error(pruned, model, x) < 1e-5


def test_sequential_beats_one_shot_least_squares_when_earlier_layers_are_pruned():
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in ((3, 8), (8, 8), (8, 8)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    data, heldout = images(64, size=12), images(64, size=12, seed=1)
    model = calibrated(nn.Sequential(*layers, nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)), data)
    x = as_float(heldout)
    sets = channel_sets(model, x[:1])
    keep = {s.name: list(range(0, s.size, 2)) for s in sets}

    stats = collect_stats(model, sets, data, {StatRequest.moments()})
    folded = copy.deepcopy(model)
    orders = {s.name: Order(removal=list(range(s.size))) for s in sets}
    compensate(folded, sets, stats, orders, keep, "lstsq")
    lstsq = apply_keep(folded, keep, x[:1])

    sequential = apply_keep(model, keep, x[:1])
    status = get_recovery("sequential").method.refit(model, sequential, sets, keep, data, seed=0)
    assert set(map(str, status.values())) == {"refit"} and len(status) == len(sets) == 3
    assert relative_error(sequential, model, x) < relative_error(lstsq, model, x)


def tiny_resnet(data: ImageSet):
    model = calibrated(create_model("resnet8", stage_widths=(8, 16, 32)), data)
    x = as_float(data)
    sets, keep = half_keep(model, x[:1])
    return model, x, sets, keep, apply_keep(model, keep, x[:1])


def test_blockwise_lowers_the_block_error_below_sequential():
    data = images(64)
    model, x, sets, keep, pruned = tiny_resnet(data)
    sequential, blockwise = copy.deepcopy(pruned), copy.deepcopy(pruned)
    get_recovery("sequential").method.refit(model, sequential, sets, keep, data, seed=0)
    recovery = get_recovery("blockwise", steps=40, batch_size=16).method
    status = recovery.refit(model, blockwise, sets, keep, data, seed=0)
    assert "Adam steps" in status["layer1.0.conv1"].what
    block = Block(("layer1.0",), ["layer1.0.conv2"], {})
    with torch.no_grad():
        inputs = torch.relu(model.bn1(model.conv1(x)))
        target = model.layer1[0](inputs)
    errors = [block_error(m, block, inputs, target, 16) for m in (pruned, sequential, blockwise)]
    assert errors[2] < errors[1] < errors[0]


@pytest.mark.parametrize("method", ["sequential", "blockwise"])
def test_same_images_and_seed_same_weights_another_seed_other_weights(method):
    data = images(32)
    model, _, sets, keep, pruned = tiny_resnet(data)
    # positions=8 samples pixels (and blockwise draws minibatches): what the run's seed drives
    options = dict(steps=5, batch_size=8) if method == "blockwise" else {}
    recovery = get_recovery(method, positions=8, **options)
    runs = []
    for seed in (0, 0, 1):
        work = copy.deepcopy(pruned)
        recovery.method.refit(model, work, sets, keep, data, seed=seed)
        runs.append(work.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], v) for k, v in pruned.state_dict().items())


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list_models())
def test_every_model_is_refit_and_unhandled_sets_say_why(name):
    data = images(12)
    model = calibrated(create_model(name, **TINY[name]), data)
    x = as_float(data)
    sets, keep = half_keep(model, x[:1], "stage")
    for method, options in (("sequential", {}), ("blockwise", {"steps": 2})):
        pruned = apply_keep(model, keep, x[:1])
        before = shapes(pruned)
        recovery = get_recovery(method, batch_size=8, positions=16, **options).method
        status = recovery.refit(model, pruned, sets, keep, data, seed=0)
        assert shapes(pruned) == before
        assert {s.name for s in sets if len(keep[s.name]) < s.size} == set(status)
        assert any(v.done for v in status.values())
        for s in sets:
            if not s.consumers:
                assert str(status[s.name]).startswith("skipped: its map is not read by plain conv/linear layers")
            else:
                assert status[s.name].done and status[s.name].what.startswith("refit"), status[s.name]
        with torch.no_grad():
            assert torch.isfinite(pruned(x)).all()


@pytest.mark.slow
def test_torchvision_resnet18_is_refit_per_block():
    data = images(8)
    model = calibrated(create_model("tv_resnet18"), data)
    x = as_float(data)
    sets, keep = half_keep(model, x[:1])
    for method, options in (("sequential", {}), ("blockwise", {"steps": 3})):
        pruned = apply_keep(model, keep, x[:1])
        before = relative_error(pruned, model, x)
        recovery = get_recovery(method, batch_size=4, **options).method
        status = recovery.refit(model, pruned, sets, keep, data, seed=0)
        assert len(status) == len(sets) and all(v.done and v.what.startswith("refit") for v in status.values())
        assert relative_error(pruned, model, x) < before


@pytest.mark.parametrize("options, message", [
    ({"name": "sequential", "ridge": -1.0}, "recover.ridge=-1.0; accepted: >= 0"),
    ({"name": "sequential", "images": 0}, "recover.images=0; accepted: >= 1"),
    ({"name": "sequential", "target": "stream"}, "recover.target=stream; accepted: block, layer"),
    ({"name": "blockwise", "steps": -5}, "recover.steps=-5; accepted: >= 0"),
    ({"name": "blockwise", "lr": 0.0}, "recover.lr=0.0; accepted: > 0"),
])
def test_bad_options_fail_with_one_line(options, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("[", r"\[")):
        get_recovery(**options)


def test_calibration_images_follow_the_option():
    assert get_recovery("sequential", images=300).method.calibration_images == 300
    assert get_recovery("blockwise").method.calibration_images == 2048


@pytest.mark.slow
def test_distillation_brings_the_outputs_closer_without_reading_a_label():
    data = images(64)
    data.labels.fill_(-1)                      # a label read anywhere (a loss, an index) would fail
    model, x, sets, keep, pruned = tiny_resnet(data)
    heldout = as_float(images(64, seed=1))
    before = relative_error(pruned, model, heldout)
    runs = [copy.deepcopy(pruned) for _ in range(2)]
    notes = [distill(model, run, data, steps=30, lr=3e-3, batch_size=16, seed=0) for run in runs]
    assert notes[0].startswith("distilled: logit error") and "after 30 Adam steps on 64 images" in notes[0]
    assert relative_error(runs[0], model, heldout) < before
    # same images, options and seed: the same weights
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))


def test_distillation_that_does_not_help_keeps_the_weights():
    data = images(32)
    model = calibrated(create_model("resnet8", stage_widths=(8, 16, 32)), data)
    twin = copy.deepcopy(model)                # already exact: no step can lower a zero error
    note = distill(model, twin, data, steps=3, lr=1e-2, batch_size=16)
    assert note.startswith("distillation: 3 Adam steps did not lower the logit error")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_distillation_is_named_in_the_label_and_checked():
    assert get_recovery("blockwise", distill_steps=300).label == "blockwise+distill300"
    assert get_recovery("none", distill_steps=5, bn_images=64).label == "bn+distill5"
    assert "distill_steps" not in get_recovery("blockwise").describe()
    for option, value, message in [("distill_steps", -1, "recover.distill_steps=-1; accepted: >= 0 (0: off)"),
                                   ("distill_images", 0, "recover.distill_images=0; accepted: >= 1"),
                                   ("distill_lr", 0.0, "recover.distill_lr=0.0; accepted: > 0")]:
        with pytest.raises(ValueError, match=rf"^{message}$".replace("(", r"\(").replace(")", r"\)")):
            get_recovery("blockwise", **{option: value})


@pytest.mark.parametrize("status, text", [
    (SetStatus(True, "refit; block layer1.0 tuned"), "refit; block layer1.0 tuned"),
    (SetStatus.skipped("no consumer"), "skipped: no consumer"),
])
def test_a_set_status_reads_back_from_the_text_the_record_holds(status, text):
    assert str(status) == text and SetStatus.parse(text) == status
