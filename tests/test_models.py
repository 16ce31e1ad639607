import pytest
import torch

from qsfm_cli.evaluate import count_macs, count_params
from qsfm_cli.models import create_model, list_models
from qsfm_cli.references import conv_linear_params

# Published figures: He et al. 2016 (params of the CIFAR ResNets), HRank/CHIP (VGG-16-BN params);
# MACs of conv + linear layers at 32x32. Params are published to two decimals (in millions).
PUBLISHED = {
    "resnet20": (None, 0.27e6),
    "resnet32": (None, 0.46e6),
    "resnet44": (None, 0.66e6),
    "resnet56": (125.49e6, 0.85e6),
    "resnet110": (252.89e6, 1.73e6),
    "vgg16_bn": (313.7e6, 14.98e6),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_macs_and_params_match_published(name):
    model = create_model(name)
    macs, params = PUBLISHED[name]
    if macs is not None:
        assert count_macs(model) == pytest.approx(macs, rel=2e-3)
    counted = conv_linear_params(model) if name == "vgg16_bn" else count_params(model)
    assert counted == pytest.approx(params, abs=0.005e6)


def test_resnet56_exact_figures():
    model = create_model("resnet56")
    assert count_params(model) == 853_018
    assert round(count_macs(model) / 1e6, 2) == 125.49


def test_mobilenetv2_cifar_variant_figures():
    model = create_model("mobilenetv2")
    assert round(count_macs(model) / 1e6, 2) == 87.98
    assert count_params(model) == 2_236_682


def test_resnet_module_names_follow_public_checkpoints():
    names = dict(create_model("resnet20").named_parameters())
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.2.bn2.bias", "linear.weight"):
        assert key in names


def test_every_registered_model_runs_and_rebuilds_from_its_widths():
    for name in list_models():
        model = create_model(name, num_classes=7).eval()
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
        rebuilt = create_model(name, num_classes=7, **model.widths())
        assert count_params(rebuilt) == count_params(model)


def test_torchvision_models_by_prefix():
    model = create_model("tv_resnet18", num_classes=10)
    assert model.fc.out_features == 10


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet57'; accepted: .*resnet56"):
        create_model("resnet57")
