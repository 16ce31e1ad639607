"""timm models: built by name, pruned exactly through Torch-Pruning (masked == pruned, as tests/test_pruning.py
checks the torchvision models), rebuilt from their architecture spec, and run through the stages on an
image folder."""
from __future__ import annotations

import json

import pytest
import torch

from qsfm_cli.counting import count_macs
from qsfm_cli.imagefolder import load_imagefolder
from qsfm_cli.loaders import input_shape
from qsfm_cli.models import create_model
from qsfm_cli.pruning import architecture, build_model

from .test_imagefolder import make_image_folder, one_thread, prune_finetune_evaluate  # noqa: F401 (fixture)
from .test_pruning import assert_generic_pruning_equals_masking, randomized

timm = pytest.importorskip("timm")

TIMM = ["timm_resnet10t", *(pytest.param(n, marks=pytest.mark.slow)
                            for n in ("timm_mobilenetv3_small_050", "timm_efficientnet_b0"))]


@pytest.mark.parametrize("name", TIMM)
def test_timm_pruning_equals_masking(name):
    sets = assert_generic_pruning_equals_masking(randomized(create_model(name, num_classes=10)))
    assert len(sets) > 3


def test_timm_spec_records_the_constructor_arguments():
    model = create_model("timm_resnet10t", num_classes=7, drop_rate=0.1)
    assert model.registry_spec == {"name": "timm_resnet10t", "num_classes": 7, "kwargs": {"drop_rate": 0.1}}
    assert build_model(architecture(model)).get_classifier().out_features == 7


def test_unknown_timm_model_is_one_line():
    with pytest.raises(ValueError, match=r"^model.name=timm_resnet_nope; accepted: timm_<a name in timm.list_models\(\)> \(timm has no 'resnet_nope'\)$"):
        create_model("timm_resnet_nope")


def test_timm_preprocessing_is_the_data_config_of_its_weights():
    from qsfm_cli.models.timm_models import preprocessing

    prep = preprocessing("timm_resnet10t")
    config = timm.data.resolve_model_data_config(timm.create_model("resnet10t"))
    assert (prep.mean, prep.std, prep.interpolation) == (config["mean"], config["std"], config["interpolation"])
    assert prep.crop_size == config["input_size"][-1] < prep.resize_size


@pytest.mark.slow
def test_timm_model_end_to_end_on_an_image_folder(tmp_path):
    splits = load_imagefolder(str(make_image_folder(tmp_path / "data")), crop_size=64, resize_size=72,
                              num_workers=0)
    out = prune_finetune_evaluate("timm_mobilenetv3_small_050", splits, tmp_path / "run", scorer="simscore")
    shape = (1, *input_shape(splits[1]))
    assert count_macs(out["pruned"], shape) < 0.8 * count_macs(out["model"], shape)
    assert out["top1"] == pytest.approx(out["result"].test_top1)
    rebuilt = build_model(json.loads(json.dumps(architecture(out["pruned"]))))
    rebuilt.load_state_dict(out["pruned"].state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(out["example"]), out["pruned"].eval()(out["example"]))
