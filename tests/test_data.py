import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from qsfm_cli.data import load_dataset

from .conftest import CIFAR_ROOT, shared_file


def test_digits_are_real_32x32_rgb_and_split_disjointly():
    train, test = load_dataset("digits")
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797
    assert set(train.labels.tolist()) == set(range(10))


def test_fake_is_seeded():
    a, _ = load_dataset("fake", seed=3)
    b, _ = load_dataset("fake", seed=3)
    assert torch.equal(a.images, b.images)


def test_sample_is_repeatable_and_without_replacement():
    train, _ = load_dataset("fake", train_size=100)
    s1, s2 = train.sample(30, seed=1), train.sample(30, seed=1)
    assert torch.equal(s1.images, s2.images) and len(s1) == 30


def test_offline_cifar_without_data_says_how_to_point_at_a_copy(tmp_path):
    with pytest.raises(FileNotFoundError, match="point dataset.root at a folder holding cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="^dataset.name=mnist; accepted: cifar10, cifar100, digits, fake$"):
        load_dataset("mnist")


def test_an_option_of_another_dataset_kind_and_a_wrong_class_count_are_refused():
    with pytest.raises(ValueError, match="^dataset.size=16; accepted: dataset.num_classes, dataset.seed$"):
        load_dataset("digits", size=16)
    with pytest.raises(ValueError, match=r"^dataset.num_classes=100; accepted: 10 \(what digits holds\)$"):
        load_dataset("digits", num_classes=100)


def write_pickle(path, obj, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def fake_cifar(root, name: str = "cifar10", n: int = 6, protocol: int = 2) -> dict:
    """A CIFAR folder of tiny batches (their MD5s differ from torchvision's list); returns them by file."""
    rng = np.random.default_rng(0)
    folder, files, meta, label, classes = {
        "cifar10": ("cifar-10-batches-py", ["data_batch_1", "data_batch_2", "test_batch"],
                    ("batches.meta", "label_names"), "labels", 10),
        "cifar100": ("cifar-100-python", ["train", "test"], ("meta", "fine_label_names"), "fine_labels", 100),
    }[name]
    (root / folder).mkdir()
    write_pickle(root / folder / meta[0], {meta[1]: [f"class{k}" for k in range(classes)], "num_vis": 3072},
                 protocol)
    batches = {}
    for file in files:
        batches[file] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         label: rng.integers(0, classes, n).tolist(), "batch_label": file}
        write_pickle(root / folder / file, batches[file], protocol)
    return batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])     # 2: bytes through _codecs.encode
def test_a_local_cifar_copy_loads_unverified_and_is_refused_verified(tmp_path, name, protocol):
    batches = fake_cifar(tmp_path, name, protocol=protocol)
    train_files, test_file = list(batches)[:-1], list(batches)[-1]
    label = "labels" if name == "cifar10" else "fine_labels"
    for verify in ("auto", False):
        train, test = load_dataset(name, str(tmp_path), download=False, verify=verify)
        assert train.num_classes == test.num_classes == (10 if name == "cifar10" else 100)
        assert torch.equal(test.images, torch.from_numpy(batches[test_file]["data"]).view(-1, 3, 32, 32))
        assert train.labels.tolist() == sum((batches[f][label] for f in train_files), [])
    with pytest.raises(FileNotFoundError, match=f"MD5 differs: {train_files[0]}"):
        load_dataset(name, str(tmp_path), download=False, verify=True)


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("verify", ["auto", False])
@pytest.mark.parametrize("file", ["data_batch_1", "test_batch", "batches.meta"])
def test_a_tampered_cifar_file_runs_no_code(tmp_path, verify, file):
    fake_cifar(tmp_path)
    marker = tmp_path / "ran"
    write_pickle(tmp_path / "cifar-10-batches-py" / file, {"data": RunsACommand(marker)})
    with pytest.raises(ValueError, match=rf"cifar-10-batches-py/{file} is not a CIFAR file: it holds \w+\.system"):
        load_dataset("cifar10", str(tmp_path), download=False, verify=verify)
    assert not marker.exists()


@pytest.mark.parametrize("content, held", [
    ({"data": np.zeros((6, 3072)), "labels": [0] * 6}, "a numpy array of float64"),
    ({"data": np.zeros((6, 3072), np.uint8), "labels": [0.5] * 6}, "a float"),
    ([1, 2], "a list"),
    ({"data": b"x", "labels": (1, 2)}, "a tuple"),
    ({"data": b"x", "labels": {1, 2}}, r"__builtin__\.set"),
])
def test_a_cifar_batch_holding_anything_else_is_named(tmp_path, content, held):
    fake_cifar(tmp_path)
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_2", content)
    with pytest.raises(ValueError, match=f"data_batch_2 is not a CIFAR file: it holds {held}"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_a_truncated_or_malformed_cifar_batch_is_named(tmp_path):
    fake_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cifar-10-batches-py/data_batch_1 is truncated or not a pickle"):
        load_dataset("cifar10", str(tmp_path), download=False, verify=False)
    write_pickle(batch, {"data": np.zeros((6, 3072), np.uint8), "labels": [10] * 6})
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR batch: its labels are not 6 integers in "
                                         r"\[0, 10\)"):
        load_dataset("cifar10", str(tmp_path), download=False, verify=False)
    write_pickle(batch, {"data": np.zeros((6, 1024), np.uint8), "labels": [0] * 6})
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR batch: no uint8 'data' array"):
        load_dataset("cifar10", str(tmp_path), download=False, verify=False)


def test_an_unverified_cifar_copy_needs_the_test_batch_and_the_metadata(tmp_path):
    fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match="missing: batches.meta"):
        load_dataset("cifar10", str(tmp_path), download=False, verify=False)


@pytest.mark.slow
def test_shared_cifar_copy_fails_the_md5_check_and_loads_unverified():
    shared_file("data", "cifar-10-batches-py", "test_batch")
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar10", str(CIFAR_ROOT), download=False, verify=True)
    train, test = load_dataset("cifar10", str(CIFAR_ROOT), download=False, verify=False)
    batches = len(list((CIFAR_ROOT / "cifar-10-batches-py").glob("data_batch_*")))
    assert len(train) == 10_000 * batches and len(test) == 10_000
    auto_train, _ = load_dataset("cifar10", str(CIFAR_ROOT), download=False)
    assert torch.equal(auto_train.images, train.images)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    with open(CIFAR_ROOT / "cifar-10-batches-py" / "test_batch", "rb") as f:
        reference = pickle.load(f, encoding="latin1")           # the file is the trusted shared copy
    assert torch.equal(test.images, torch.from_numpy(reference["data"]).view(-1, 3, 32, 32))
    assert test.labels.tolist() == reference["labels"]


def test_a_dataset_root_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10", str(tmp_path / "file"))
    assert str(err.value) == (f"dataset.root={str(tmp_path / 'file')!r} is a file; accepted: a folder holding "
                              f"cifar-10-batches-py/, or one to download it into")


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, root, **kwargs):           # what torchvision does before the network fails
        Path(root).mkdir(parents=True, exist_ok=True)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    root = tmp_path / "new" / "data"
    with pytest.raises(FileNotFoundError, match=r"download failed: \[Errno 101\] Network is unreachable"):
        load_dataset("cifar10", str(root))
    assert list(tmp_path.iterdir()) == []
