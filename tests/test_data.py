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
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; accepted: cifar10, cifar100, digits, fake"):
        load_dataset("mnist")


@pytest.mark.slow
def test_shared_cifar_copy_fails_the_md5_check_and_loads_unverified():
    shared_file("data", "cifar-10-batches-py", "test_batch")
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar10", str(CIFAR_ROOT), download=False, verify=True)
    train, test = load_dataset("cifar10", str(CIFAR_ROOT), download=False, verify=False)
    assert len(train) == 10_000 and len(test) == 10_000
    auto_train, _ = load_dataset("cifar10", str(CIFAR_ROOT), download=False)
    assert torch.equal(auto_train.images, train.images)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
