"""torchvision's published weights for ``tv_<name>`` models: the default weights' URL through torch.hub
(sha256-prefix checked, weights_only), one line offline, and the preprocessing the weights expect."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision.models as tvm

from qsfm_cli.checkpoints import CheckpointError
from qsfm_cli.models import create_model
from qsfm_cli.models.torchvision_models import default_weights, load_pretrained, preprocessing


@pytest.mark.parametrize("name", ["tv_mobilenet_v2", "tv_efficientnet_b3", "tv_resnet50"])
def test_preprocessing_is_the_default_weights_transform(name):
    expected = tvm.get_model_weights(name[3:]).DEFAULT.transforms()
    prep = preprocessing(name)
    assert (list(prep.mean), list(prep.std)) == (list(expected.mean), list(expected.std))
    assert (prep.crop_size, prep.resize_size) == (expected.crop_size[0], expected.resize_size[0])
    assert prep.interpolation == expected.interpolation.value


def test_presets_differ_between_models():
    assert preprocessing("tv_efficientnet_b3").crop_size != preprocessing("tv_mobilenet_v2").crop_size


def test_load_pretrained_fetches_the_default_weights_checked(monkeypatch, tmp_path):
    source = create_model("tv_mobilenet_v3_small", num_classes=1000)
    calls = []

    def fake_download(url, dst, hash_prefix, **kwargs):
        calls.append((url, hash_prefix))
        torch.save(source.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = load_pretrained(create_model("tv_mobilenet_v3_small", num_classes=1000), "tv_mobilenet_v3_small")
    (url, hash_prefix), = calls
    assert url == tvm.get_model_weights("mobilenet_v3_small").DEFAULT.url
    assert hash_prefix and hash_prefix in url
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_offline_is_one_line_naming_the_url(monkeypatch, tmp_path):
    def offline(url, dst, hash_prefix, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(create_model("tv_resnet18", num_classes=1000), "tv_resnet18")
    message = str(err.value)
    assert "\n" not in message and tvm.ResNet18_Weights.DEFAULT.url in message and "model.checkpoint=PATH" in message


def test_class_count_mismatch_and_unknown_weights_are_one_line():
    with pytest.raises(ValueError, match="classify 1000 classes, the model 10"):
        load_pretrained(create_model("tv_resnet18", num_classes=10), "tv_resnet18")
    with pytest.raises(ValueError, match="torchvision publishes no weights for model 'tv_nope'"):
        default_weights("tv_nope")
