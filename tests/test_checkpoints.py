import argparse

import pytest
import torch

from qsfm_cli.checkpoints import (PRETRAINED_MEAN, PRETRAINED_STD, CheckpointError, load_weights,
                                  pretrained_url)
from qsfm_cli.data import load_dataset
from qsfm_cli.evaluate import accuracy
from qsfm_cli.models import create_model

from .conftest import CIFAR_ROOT, shared_file


def test_wrapped_and_prefixed_state_dict_loads(tmp_path):
    source = create_model("resnet8")
    wrapped = {"best_prec1": 1.0, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.th")
    target = load_weights(create_model("resnet8"), str(tmp_path / "ckpt.th"))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_raw_state_dict_loads(tmp_path):
    source = create_model("resnet8")
    torch.save(source.state_dict(), tmp_path / "raw.pt")
    target = load_weights(create_model("resnet8"), str(tmp_path / "raw.pt"))
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_wrong_architecture_names_keys_and_shapes(tmp_path):
    torch.save(create_model("resnet20").state_dict(), tmp_path / "r20.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet8", stage_widths=(4, 8, 16)), str(tmp_path / "r20.pt"))
    message = str(err.value)
    assert "\n" not in message
    assert "unexpected: layer1.1.conv1.weight" in message
    assert "shape: conv1.weight (16, 3, 3, 3) vs model (4, 3, 3, 3)" in message


def test_missing_checkpoint_is_one_clear_line():
    with pytest.raises(CheckpointError, match=r"checkpoint 'nope\.th' not found"):
        load_weights(create_model("resnet8"), "nope.th")


def test_pickled_objects_need_the_explicit_flag(tmp_path):
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {}}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="model.allow_pickle=true"):
        load_weights(create_model("resnet8"), str(tmp_path / "pickled.pt"))


def test_unknown_pretrained_name_lists_the_available_ones():
    with pytest.raises(CheckpointError, match="available for: resnet20, resnet32"):
        pretrained_url("vgg16_bn")
    assert pretrained_url("resnet56").endswith("resnet56-4bfd9763.th")


@pytest.mark.slow
def test_shared_resnet20_scores_its_published_accuracy():
    path = shared_file("checkpoints", "resnet20-12fca82f.th")
    shared_file("data", "cifar-10-batches-py", "test_batch")
    model = load_weights(create_model("resnet20"), str(path))
    _, test = load_dataset("cifar10", str(CIFAR_ROOT), download=False, verify=False)
    top1, _ = accuracy(model, test.with_normalization(PRETRAINED_MEAN, PRETRAINED_STD))
    assert top1 == pytest.approx(91.73, abs=0.005)
