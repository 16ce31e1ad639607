"""Adapters are found by model type, and a pruned model's architecture spec is checked before anything is
built from it: a tampered ``pruned_model.pt`` fails with one line, allocating nothing sized by the spec."""
import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qsfm_cli import load_pruned, save_pruned
from qsfm_cli.models import create_model, list_models, register_model
from qsfm_cli.models.resnet_cifar import CifarResNet
from qsfm_cli.pruning import apply_keep, architecture, build_model, channel_sets, get_adapter, register_adapter
from qsfm_cli.pruning import base
from qsfm_cli.pruning.generic import GenericAdapter
from qsfm_cli.pruning.resnet_cifar import ResNetAdapter

X = torch.zeros(1, 3, 32, 32)
# The largest tensor a check may create off the meta device: far below any layer a tampered width asks for.
SMALL = 1_000_000


class NoLargeTensors(TorchFunctionMode):
    """Fails the test as soon as a real (non-meta) tensor of more than SMALL elements is made."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type != "meta" and out.numel() > SMALL:
            raise AssertionError(f"{func.__name__} made a tensor of {out.numel()} elements")
        return out


def pruned_resnet20() -> nn.Module:
    return apply_keep(create_model("resnet20"), {"layer1.0.conv1": [0, 3, 7], "layer2.0.conv2": list(range(20))}, X)


def tampered(path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload["architecture"], payload["state_dict"])
    torch.save(payload, path)


def set_in(*keys_and_value):
    *keys, value = keys_and_value

    def edit(arch, _state):
        node = arch
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


RESNET_TAMPERING = [
    (set_in("kwargs", "mid_widths", 3, 10**9), "kwargs.mid_widths[3] is 1000000000; accepted: an integer in [1, 32]"),
    (set_in("kwargs", "stage_widths", 1, 10**9),
     "kwargs.stage_widths[1] is 1000000000; accepted: an integer in [1, 32]"),
    (set_in("kwargs", "stem_width", 0), "kwargs.stem_width is 0; accepted: an integer in [1, 16]"),
    (set_in("kwargs", "mid_widths", 0, True), "kwargs.mid_widths[0] is True"),
    (set_in("kwargs", "mid_widths", 0, 2.5), "kwargs.mid_widths[0] is 2.5"),
    (set_in("kwargs", "mid_widths", [16] * 8), "accepted: a list of 9 integers"),
    (set_in("kwargs", "shortcut_indices", 1, [0] * 16), "non-negative ones distinct"),
    (set_in("kwargs", "shortcut_indices", 1, [40] + [-1] * 15), "kwargs.shortcut_indices[1] is [40, -1"),
    (set_in("kwargs", "shortcut_indices", 1, [0]), "null or a list of 16 integers"),
    (set_in("kwargs", "depth", 1000), "kwargs key is 'depth'; accepted: stage_widths, mid_widths"),
    (set_in("shapes", {}), "architecture key is 'shapes'; accepted: name, num_classes, kwargs"),
    (set_in("name", "resnet57"), "model.name=resnet57; accepted: "),
    (lambda arch, state: arch.pop("name"), "architecture keys is ['kwargs', 'num_classes']"),
    (set_in("name", 56), "name is 56"),
    (set_in("num_classes", -3), "num_classes is -3; accepted: a positive integer"),
    (set_in("num_classes", 10**9), "state_dict does not fit its architecture spec (shape: linear.weight (10, 64) "
                                   "vs spec (1000000000, 64)"),
    (lambda arch, state: state.__setitem__("layer1.0.conv1.weight", torch.zeros(4, 16, 3, 3)),
     "shape: layer1.0.conv1.weight (4, 16, 3, 3) vs spec (3, 16, 3, 3)"),
    (lambda arch, state: state.pop("linear.bias"), "missing: linear.bias"),
]


@pytest.mark.parametrize("edit, message", RESNET_TAMPERING)
def test_tampered_pruned_file_fails_with_one_line_before_building(tmp_path, edit, message):
    path = tmp_path / "pruned.pt"
    save_pruned(path, pruned_resnet20())
    assert load_pruned(path).layer1[0].conv1.out_channels == 3
    tampered(path, edit)
    with NoLargeTensors(), pytest.raises(ValueError) as err:
        load_pruned(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, edit, message", [
    ("vgg16_bn", set_in("kwargs", "cfg", 2, 64), "kwargs.cfg[2] is 64; accepted: 'M' (a pooling position)"),
    ("vgg16_bn", set_in("kwargs", "cfg", 0, 10**9), "kwargs.cfg[0] is 1000000000; accepted: an integer in [1, 64]"),
    ("vgg16_bn", set_in("kwargs", "hidden", 4096), "kwargs.hidden is 4096; accepted: an integer in [1, 512]"),
    ("mobilenetv2", set_in("kwargs", "out_widths", 2, 20), "kwargs.out_widths[2] is 20; accepted: 24 (block 2 is "
                                                            "residual"),
    ("mobilenetv2", set_in("kwargs", "hidden_widths", 0, 8), "kwargs.hidden_widths[0] is 8; accepted: 32 (block 0 "
                                                              "has no expand conv"),
    ("mobilenetv2", set_in("kwargs", "head", 10**9), "kwargs.head is 1000000000; accepted: an integer in [1, 1280]"),
])
def test_tampered_family_specs(name, edit, message):
    arch = architecture(create_model(name))
    edit(arch, None)
    with NoLargeTensors(), pytest.raises(ValueError) as err:
        build_model(arch)
    assert message in str(err.value) and "\n" not in str(err.value)


def pruned_tv_resnet18() -> nn.Module:
    model = create_model("tv_resnet18")
    return apply_keep(model, {"conv1": list(range(32)), "layer1.0.conv1": [1, 2]}, torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("edit, message", [
    (set_in("shapes", "layer1.0.conv1", "attrs", "out_channels", 10**9),
     "shapes['layer1.0.conv1'].attrs.out_channels is 1000000000; accepted: an integer in [1, 64]"),
    (set_in("shapes", "layer1.0.conv1", "tensors", "weight", [10**9, 32, 3, 3]),
     "shapes['layer1.0.conv1'].tensors.weight is [1000000000, 32, 3, 3]; accepted: a size of 4 integers, each at "
     "most [64, 64, 3, 3]"),
    (set_in("shapes", "layer1.0.conv1", "tensors", "weight", [2, 32, 3]), "a size of 4 integers"),
    (set_in("shapes", "layer1.0.conv1", "tensors", "weight", [3, 32, 3, 3]),
     "weight of size [2, 32, 3, 3] (what the layer's attributes give)"),
    (set_in("shapes", "layer9.conv1", {}), "shapes key is 'layer9.conv1'"),
    (set_in("shapes", "layer1.0.conv1", "attrs", "padding", 5), "attrs key is 'padding'"),
    (set_in("kwargs", "no_such_argument", 1), "keyword arguments tv_resnet18 accepts (TypeError"),
])
def test_tampered_torchvision_specs(edit, message):
    arch = copy.deepcopy(architecture(pruned_tv_resnet18()))
    edit(arch, None)
    with NoLargeTensors(), pytest.raises(ValueError) as err:
        build_model(arch)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_torchvision_arguments_may_not_widen_the_network():
    arch = {"name": "tv_resnet50", "num_classes": 10, "kwargs": {"width_per_group": 10**6}, "shapes": {}}
    with NoLargeTensors(), pytest.raises(ValueError, match="accepted: arguments that build tv_resnet50 no larger "
                                                           "than its default"):
        build_model(arch)


def test_torchvision_spec_round_trips_through_the_file(tmp_path):
    pruned = pruned_tv_resnet18().eval()
    save_pruned(tmp_path / "tv.pt", pruned)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "tv.pt")(x), pruned(x))


def test_adapters_are_found_by_model_type():
    assert {type(get_adapter(create_model(name))).__name__ for name in list_models()} <= {
        "ResNetAdapter", "VGGAdapter", "MobileNetV2Adapter"}

    class WideResNet(CifarResNet):
        pass

    assert isinstance(get_adapter(WideResNet(20)), ResNetAdapter)
    assert isinstance(get_adapter(create_model("tv_resnet18")), GenericAdapter)


def test_registering_a_type_twice_warns(monkeypatch):
    monkeypatch.setattr(base, "_ADAPTERS", dict(base._ADAPTERS))

    class Other(ResNetAdapter):
        pass

    with pytest.warns(UserWarning, match="adapter for CifarResNet registered twice; the later \\(Other\\) wins"):
        register_adapter(CifarResNet)(Other)
    assert isinstance(get_adapter(create_model("resnet8")), Other)


class TwoConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_a_registered_model_without_adapter_goes_through_the_fallback(scratch_models):

    def two_conv(num_classes: int = 10, **kwargs) -> TwoConvNet:
        return TwoConvNet(num_classes, **kwargs)

    register_model(two_conv)
    model = create_model("two_conv", num_classes=3, width=6).eval()
    assert isinstance(get_adapter(model), GenericAdapter)
    assert [s.name for s in channel_sets(model, X, "all")] == ["conv1", "conv2"]
    pruned = apply_keep(model, {"conv1": [0, 5]}, X)
    rebuilt = build_model(architecture(pruned), pruned.state_dict())
    rebuilt.load_state_dict(pruned.state_dict())
    assert rebuilt.conv1.out_channels == 2 and rebuilt.bn1.num_features == 2
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(X), pruned(X))
