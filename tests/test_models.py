import pytest
import torch

from qsfm_cli.evaluate import count_macs, count_params
from qsfm_cli.models import create_model, list_models
from qsfm_cli.papers import PUBLISHED_SIZES, conv_linear_params, published_size


@pytest.mark.parametrize("name", [n for n in list_models() if published_size(n) is not None])
def test_macs_and_params_match_published(name):
    """MACs of conv + linear layers at 32x32; params as published, to two decimals (in millions)."""
    model = create_model(name)
    size = published_size(name)
    if size.macs_M is not None:
        assert count_macs(model) / 1e6 == pytest.approx(size.macs_M, rel=2e-3)
    counted = conv_linear_params(model) if size.params_counting == "conv_linear" else count_params(model)
    assert counted / 1e6 == pytest.approx(size.params_M, abs=0.005)


def test_published_sizes_name_registered_models_and_known_countings():
    assert {row.model for row in PUBLISHED_SIZES} <= set(list_models())
    assert {row.params_counting for row in PUBLISHED_SIZES} <= {"all", "conv_linear"}


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
