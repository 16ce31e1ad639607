import argparse

import pytest
import torch

from qsfm_cli.checkpoints import CheckpointError, load_weights
from qsfm_cli.data import load_dataset
from qsfm_cli.evaluate import accuracy
from qsfm_cli.models import create_model, model_card, pretrained_url

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


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_objects_need_the_explicit_flag(tmp_path, zip_format):
    state = create_model("resnet8").state_dict()
    path = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": state}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet8"), str(path))
    assert str(err.value) == (f"cannot read checkpoint {str(path)!r}: it pickles argparse.Namespace, not only "
                              "tensors; model.allow_pickle=true loads it (only for a file you trust)")
    loaded = load_weights(create_model("resnet8"), str(path), allow_pickle=True)
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage, zip_format, message", [
    (lambda data: b"", True, "the file is empty"),
    (_truncated, True, "not a torch checkpoint (truncated or corrupt?)"),
    (_truncated, False, "not a torch checkpoint (truncated or corrupt?)"),
    (lambda data: b"epoch 3, lr 0.1\n", True, "not a torch checkpoint (truncated or corrupt?)"),
    (lambda data: bytes(range(256)) * 4, True, "not a torch checkpoint (truncated or corrupt?)"),
])
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_a_broken_file_is_called_broken_not_unsafe(tmp_path, damage, zip_format, message, allow_pickle):
    path = tmp_path / "broken.pt"
    torch.save(create_model("resnet8").state_dict(), path, _use_new_zipfile_serialization=zip_format)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet8"), str(path), allow_pickle=allow_pickle)
    assert str(err.value) == f"cannot read checkpoint {str(path)!r}: {message}"


def test_file_urls_are_read_in_place(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    source = create_model("resnet8")
    path = tmp_path / "my weights" / "r8.pt"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)
    loaded = load_weights(create_model("resnet8"), path.as_uri())  # file:///.../my%20weights/r8.pt
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    assert not hub.exists(), "a local file must not be copied into torch.hub's cache"
    with pytest.raises(CheckpointError, match=r"checkpoint 'file:///nowhere/r8\.pt' not found"):
        load_weights(create_model("resnet8"), "file:///nowhere/r8.pt")
    with pytest.raises(CheckpointError, match="names host 'server'; a file:// URL must be local"):
        load_weights(create_model("resnet8"), "file://server/share/r8.pt")


def test_urls_are_cached_checked_and_read_like_files(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    published = tmp_path / "published.pt"
    torch.save({"args": argparse.Namespace(), "state_dict": create_model("resnet8").state_dict()}, published)
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        with open(dst, "wb") as f:
            f.write(published.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    url = "https://example.org/models/r8-0123abcd.pt"
    for _ in range(2):
        with pytest.raises(CheckpointError, match="it pickles argparse.Namespace"):
            load_weights(create_model("resnet8"), url)
    assert fetched == [(url, "0123abcd")]  # once, checked against the file name's hash prefix
    assert (hub / "checkpoints" / "r8-0123abcd.pt").is_file()

    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match="cannot fetch checkpoint .*network unreachable; offline, download"):
        load_weights(create_model("resnet8"), "https://example.org/models/other.pt")


def test_pretrained_urls_come_from_the_cards():
    with pytest.raises(CheckpointError, match=r"available for: resnet20 \(cifar10\), resnet32 \(cifar10\)"):
        pretrained_url("vgg16_bn")
    assert pretrained_url("resnet56") == model_card("resnet56").url


@pytest.mark.slow
def test_shared_resnet20_scores_its_published_accuracy():
    path = shared_file("checkpoints", "resnet20-12fca82f.th")
    shared_file("data", "cifar-10-batches-py", "test_batch")
    model = load_weights(create_model("resnet20"), str(path))
    _, test = load_dataset("cifar10", str(CIFAR_ROOT), download=False, verify=False)
    card = model_card("resnet20")
    top1, _ = accuracy(model, test.with_normalization(card.mean, card.std))
    assert top1 == pytest.approx(91.73, abs=0.005)
