import json
import warnings

import pytest
import torch

import qsfm_cli.models as models
from qsfm_cli.counting import count_macs, count_params
from qsfm_cli.models import (WeightCard, create_model, default_normalization, list_models, model_card,
                             pretrained_models, register_model)
from qsfm_cli.papers import PUBLISHED_SIZES, conv_linear_params, published_size
from qsfm_cli.pruning import architecture, build_model


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


def test_every_registered_model_runs_and_rebuilds_from_its_spec():
    for name in list_models():
        model = create_model(name, num_classes=7).eval()
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
        rebuilt = build_model(json.loads(json.dumps(architecture(model))), model.state_dict())
        assert count_params(rebuilt) == count_params(model)


def test_torchvision_models_by_prefix():
    model = create_model("tv_resnet18", num_classes=10)
    assert model.fc.out_features == 10


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match=r"^model.name=resnet57; accepted: .*resnet56"):
        create_model("resnet57")


@pytest.mark.parametrize("name", pretrained_models())
def test_weight_cards_describe_what_the_weights_fit(name):
    card = model_card(name)
    assert card.url.endswith(f"{name}-{card.sha256}.th") and card.license and card.source
    model = create_model(name, num_classes=card.num_classes).eval()
    assert model(torch.zeros(1, *card.input_size)).shape == (1, card.num_classes)
    assert default_normalization(name, card.dataset) == (card.mean, card.std)
    assert default_normalization(name, "digits") is None  # trained here: the dataset's own statistics


@pytest.mark.parametrize("name", [n for n in list_models() if n not in pretrained_models()])
def test_models_without_public_weights_have_no_card(name):
    assert model_card(name) is None and default_normalization(name, "cifar10") is None


def test_torchvision_models_have_no_card():
    assert model_card("tv_resnet18") is None and default_normalization("tv_resnet18", "cifar10") is None


@pytest.mark.parametrize("fields, message", [
    ({"url": "https://host/resnet20.th"}, "must name its file <name>-12fca82f.<ext>"),
    ({"sha256": "12FCA82F"}, "sha256 '12FCA82F' must be 8 to 64 lowercase hex digits"),
])
def test_a_card_must_carry_a_checkable_hash(fields, message):
    good = dict(url="https://host/resnet20-12fca82f.th", sha256="12fca82f", mean=(0.5,) * 3, std=(0.25,) * 3,
                input_size=(3, 32, 32), num_classes=10, dataset="cifar10", source="test", license="MIT")
    WeightCard(**good)
    with pytest.raises(ValueError, match=message):
        WeightCard(**{**good, **fields})


def test_a_name_registered_twice_warns(scratch_models):
    original = models.MODELS.get("resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_model(original)  # the same constructor again (a re-import) is no duplicate

    def resnet20(num_classes: int = 10):
        return torch.nn.Linear(3, num_classes)

    with pytest.warns(UserWarning, match="model 'resnet20' registered twice; the later definition wins"):
        register_model(resnet20)
    assert isinstance(create_model("resnet20"), torch.nn.Linear) and model_card("resnet20") is None
