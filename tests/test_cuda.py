"""The CUDA path: what must hold on a GPU, run by ``scripts/gpu_check.sh`` there.

The device comes from ``QSFM_TEST_DEVICE`` (default ``cuda``; skipped without one), so that
``gpu_check.sh --dry`` runs the same tests on the CPU.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from qsfm_cli.collect import collect_stats
from qsfm_cli.data import load_dataset
from qsfm_cli.loaders import DeviceLoader
from qsfm_cli.models import create_model
from qsfm_cli.pruning import apply_keep, channel_sets
from qsfm_cli.recover import get_recovery
from qsfm_cli.scoring import get_scorer
from qsfm_cli.train import STATE_FILE, Execution, TrainRecipe, train

from .conftest import SignalAt

DEVICE = os.environ.get("QSFM_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (QSFM_TEST_DEVICE=cpu runs it here)")]


@pytest.fixture(scope="module")
def data():
    return load_dataset("fake", size=16, train_size=128, test_size=32, seed=0)


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20").eval()


def test_collected_statistics_agree_with_the_cpu(data):
    train_set, _ = data
    model = resnet()
    sets = channel_sets(model, torch.zeros(1, 3, 16, 16))
    requests = get_scorer("qsfm").requests() | get_recovery("lstsq").method.requests()
    on_cpu = collect_stats(model, sets, train_set, requests, batch_size=32, device="cpu")
    on_device = collect_stats(copy.deepcopy(model), sets, train_set, requests, batch_size=32, device=DEVICE)
    for name, stats in on_cpu.items():
        assert torch.equal(stats.dead, on_device[name].dead)
        for key, value in stats.values.items():
            torch.testing.assert_close(on_device[name].values[key], value, rtol=1e-4, atol=1e-5)


def test_pruning_and_compensation_on_the_device(data):
    train_set, test_set = data
    model = resnet().to(DEVICE)
    example = torch.zeros(1, 3, 16, 16, device=DEVICE)
    sets = channel_sets(model, example)
    recovery = get_recovery("lstsq").method
    scorer = get_scorer("l1")
    stats = collect_stats(model, sets, train_set, recovery.requests(), batch_size=32, device=DEVICE)
    orders = scorer.score(model, sets, stats)
    keep = {s.name: sorted(orders[s.name].removal[s.size // 2:]) for s in sets}
    edited = copy.deepcopy(model)
    status = recovery.fold(edited, sets, stats, orders, keep)
    pruned = apply_keep(edited, keep, example)
    assert set(map(str, status.values())) == {"compensated"}
    assert next(pruned.parameters()).device.type == torch.device(DEVICE).type
    x = next(iter(DeviceLoader(test_set, 32, device=DEVICE)))[0]
    with torch.no_grad():
        assert torch.isfinite(pruned(x)).all()


def test_bf16_autocast_training_step_lowers_the_loss(data):
    train_set, test_set = data
    model = resnet()
    recipe = TrainRecipe(epochs=3, batch_size=32, lr=0.05)
    result = train(model, train_set, test_set, recipe, device=DEVICE, seed=0, progress=False,
                   execution=Execution(amp="bf16", deterministic=False))
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_interrupted_deterministic_finetune_resumes_bit_identical(data, tmp_path):
    train_set, test_set = data                       # 128 images / batch 32 = 4 steps per epoch
    recipe = TrainRecipe(epochs=2, batch_size=32, lr=0.05)
    execution = Execution(amp="bf16", deterministic=True)
    reference = SignalAt(resnet())
    train(reference, train_set, test_set, recipe, device=DEVICE, seed=1, execution=execution,
          run_dir=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(SignalAt(resnet(), 6), train_set, test_set, recipe, device=DEVICE, seed=1, execution=execution,
              run_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / STATE_FILE).is_file()
    resumed = SignalAt(resnet())
    train(resumed, train_set, test_set, recipe, device=DEVICE, seed=1, execution=execution,
          run_dir=tmp_path / "b", resume=True, progress=False)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_device_resident_loader_keeps_batches_on_the_device(data):
    train_set, _ = data
    loader = DeviceLoader(train_set, 32, device=DEVICE, train=True, seed=0)
    x, y = next(iter(loader))
    assert x.device.type == y.device.type == torch.device(DEVICE).type
    assert x.dtype == torch.float32 and x.shape == (32, 3, 16, 16)
