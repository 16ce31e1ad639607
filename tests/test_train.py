"""Trainer, schedules, configs, baseline cache and both data loaders, on tiny models and synthetic data."""
from __future__ import annotations

import csv
import logging
import math
import re
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from qsfm_cli import baseline as baseline_mod
from qsfm_cli.app import config_dir
from qsfm_cli.baseline import trained_baseline
from qsfm_cli.data import ImageSet, load_dataset
from qsfm_cli.loaders import DeviceLoader, TorchvisionLoader, make_loader
from qsfm_cli.evaluate import accuracy
from qsfm_cli.train import STATE_FILE, Execution, NonFiniteLossError, TrainRecipe, lr_factor, train

from .conftest import SignalAt

CONF = Path(__file__).resolve().parents[1] / "conf" / "finetune"
FAST = dict(batch_size=32, lr=0.05)


@pytest.fixture(scope="module")
def data() -> tuple[ImageSet, ImageSet]:
    return load_dataset("fake", size=16, train_size=192, test_size=64, seed=0)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, 10))


class Wrapped(SignalAt):
    """``tiny_net`` plus a hook on the n-th training forward: a signal (Ctrl-C unless ``signum`` says), or NaN
    logits from then on."""

    def __init__(self, seed: int = 0, signal_at: int | None = None, nan_from: int | None = None,
                 signum: int = signal.SIGINT):
        super().__init__(tiny_net(seed), signal_at, signum)
        self.nan_from = nan_from
        self.on_first_nan = lambda: None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and self.nan_from is not None and self.calls >= self.nan_from:
            if self.calls == self.nan_from:
                self.on_first_nan()
            return out * float("nan")
        return out


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- training ------------------------------------------------------------------------------------------

def test_loss_decreases_and_log_is_written(data, tmp_path):
    train_set, test_set = data
    model = tiny_net()
    result = train(model, train_set, test_set, TrainRecipe(epochs=5, **FAST), device="cpu", seed=0,
                   run_dir=tmp_path, progress=False)
    losses = [row["loss"] for row in result.history]
    assert result.epochs_run == 5 and len(losses) == 5
    assert losses[-1] < losses[0] - 0.05
    assert result.test_top1 == result.history[-1]["test_top1"]
    assert result.test_top1 == pytest.approx(accuracy(model, test_set, device="cpu")[0])
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert list(rows[0]) == ["epoch", "lr", "loss", "train_top1", "test_top1", "seconds"]
    assert float(rows[-1]["loss"]) == pytest.approx(losses[-1])


def test_zero_epochs_returns_at_once(data, tmp_path):
    model = tiny_net()
    before = weights(model)
    result = train(model, *data, TrainRecipe(epochs=0), device="cpu", seed=0, run_dir=tmp_path)
    assert result.epochs_run == 0 and result.history == [] and result.test_top1 is None
    assert_same_weights(before, weights(model))
    assert not (tmp_path / STATE_FILE).exists()


def test_same_seed_same_weights(data):
    recipe = TrainRecipe(epochs=2, **FAST)
    runs = []
    for _ in range(2):
        model = tiny_net()
        train(model, *data, recipe, device="cpu", seed=3, progress=False)
        runs.append(weights(model))
    assert_same_weights(*runs)


@pytest.mark.parametrize("signal_at", [8, 12], ids=["mid-epoch", "last-step-of-epoch"])
def test_ctrl_c_saves_and_resume_matches_uninterrupted(data, tmp_path, signal_at):
    train_set, test_set = data                       # 192 images / batch 32 = 6 steps per epoch
    recipe = TrainRecipe(epochs=3, **FAST)
    reference = Wrapped()
    train(reference, train_set, test_set, recipe, device="cpu", seed=1, run_dir=tmp_path / "a", progress=False)

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="resume=true"):
        train(Wrapped(signal_at=signal_at), train_set, test_set, recipe, device="cpu", seed=1,
              run_dir=tmp_path / "b", progress=False)
    assert signal.getsignal(signal.SIGINT) is handler
    state = torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, signal_at - 6)

    resumed = Wrapped()              # the same starting model, as a rerun of the same config rebuilds it
    result = train(resumed, train_set, test_set, recipe, device="cpu", seed=1, run_dir=tmp_path / "b",
                   resume=True, progress=False)
    assert result.epochs_run == 2 and [r["epoch"] for r in result.history] == [1, 2, 3]
    assert_same_weights(weights(reference), weights(resumed))
    log_a = list(csv.DictReader((tmp_path / "a" / "train_log.csv").open()))
    log_b = list(csv.DictReader((tmp_path / "b" / "train_log.csv").open()))
    for row_a, row_b in zip(log_a, log_b, strict=True):
        assert {k: row_a[k] for k in ("epoch", "lr", "loss", "train_top1", "test_top1")} == \
               {k: row_b[k] for k in ("epoch", "lr", "loss", "train_top1", "test_top1")}


def test_preemption_saves_then_hands_over_to_submitit_and_the_requeued_job_resumes(data, tmp_path, monkeypatch):
    """submitit's pre-emption handler (here a stand-in that, like submitit's, requeues and exits) runs only
    once the mid-epoch checkpoint is on disk; the requeued job, run with resume=true, ends as if never
    stopped."""
    train_set, test_set = data
    recipe = TrainRecipe(epochs=2, **FAST)
    reference = Wrapped()
    train(reference, train_set, test_set, recipe, device="cpu", seed=1, run_dir=tmp_path / "a", progress=False)

    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    requeued = []

    def submitit_handler(signum, frame):
        state = torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)
        requeued.append((signal.Signals(signum).name, state["epoch"], state["step"]))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            train(Wrapped(signal_at=4, signum=signal.SIGUSR2), train_set, test_set, recipe, device="cpu", seed=1,
                  run_dir=tmp_path / "b", progress=False)
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert requeued == [("SIGUSR2", 0, 4)]

    resumed = Wrapped()
    train(resumed, train_set, test_set, recipe, device="cpu", seed=1, run_dir=tmp_path / "b", resume=True,
          progress=False)
    assert_same_weights(weights(reference), weights(resumed))


def test_resume_of_finished_run_loads_weights(data, tmp_path):
    recipe = TrainRecipe(epochs=1, **FAST)
    done = tiny_net()
    first = train(done, *data, recipe, device="cpu", seed=0, run_dir=tmp_path, progress=False)
    again = tiny_net()
    second = train(again, *data, recipe, device="cpu", seed=0, run_dir=tmp_path, resume=True, progress=False)
    assert second.epochs_run == 0 and second.test_top1 == first.test_top1
    assert_same_weights(weights(done), weights(again))


def test_resume_onto_a_different_model_is_refused(data, tmp_path):
    train(tiny_net(), *data, TrainRecipe(epochs=1, **FAST), device="cpu", seed=0, run_dir=tmp_path,
          progress=False)
    with pytest.raises(ValueError, match="written for a different model"):
        train(tiny_net(seed=5), *data, TrainRecipe(epochs=1, **FAST), device="cpu", seed=0, run_dir=tmp_path,
              resume=True, progress=False)


def test_resume_with_another_recipe_is_refused(data, tmp_path):
    train(tiny_net(), *data, TrainRecipe(epochs=1, **FAST), device="cpu", seed=0, run_dir=tmp_path,
          progress=False)
    with pytest.raises(ValueError, match=r"different recipe \(lr: 0.05 -> 0.1\)"):
        train(tiny_net(), *data, TrainRecipe(epochs=1, **{**FAST, "lr": 0.1}), device="cpu", seed=0,
              run_dir=tmp_path, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    model = Wrapped(nan_from=6 + 3)                  # epoch 2, step 3
    snapshot = {}
    model.on_first_nan = lambda: snapshot.update(bytes=(tmp_path / STATE_FILE).read_bytes())
    with pytest.raises(NonFiniteLossError, match=r"epoch 2/3, step 3/6.*last good checkpoint"):
        train(model, *data, TrainRecipe(epochs=3, **FAST), device="cpu", seed=0, run_dir=tmp_path,
              progress=False)
    assert (tmp_path / STATE_FILE).read_bytes() == snapshot["bytes"]
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def finetune_option(name: str) -> TrainRecipe:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        node = compose("config", overrides=[f"finetune={name}"]).finetune
    return TrainRecipe.from_dict(OmegaConf.to_container(node))


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_finetune_configs_compose_and_run_one_epoch(data, name):
    recipe = finetune_option(name)
    train_set, test_set = data[0].sample(64, 0), data[1]
    if recipe.epochs:
        recipe = replace(recipe, epochs=1)
    result = train(tiny_net(), train_set, test_set, recipe, device="cpu", seed=0, progress=False)
    assert result.epochs_run == recipe.epochs
    assert all(math.isfinite(r["loss"]) for r in result.history)


def test_protocol_configs_match_the_papers():
    hrank = finetune_option("hrank")
    assert (hrank.lr, hrank.schedule, hrank.weight_decay, hrank.batch_size) == (0.01, "step", 5e-4, 128)
    assert [s // 100 for s in hrank.milestone_steps(100)] == [50, 100]
    chip = finetune_option("chip")
    assert (chip.lr, chip.schedule, chip.warmup_epochs, chip.weight_decay, chip.batch_size) == \
           (0.01, "cosine", 5, 0.005, 256)
    assert finetune_option("none").epochs == 0 and finetune_option("cpu_short").epochs == 2


# --- recipe and schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (dict(schedule="linear"), "schedule=linear; accepted: step, cosine"),
    (dict(milestones=[0.5, 2.5]), "milestones=[0.5, 2.5]; accepted: fractions in (0, 1)"),
    (dict(nesterov=True, momentum=0.0), "momentum=0.0; accepted with nesterov=true: > 0"),
    (dict(batch_size=0), "batch_size=0; accepted: >= 1"),
    (dict(lr=float("inf")), "lr=inf; accepted: a finite number"),
])
def test_bad_recipe_values_are_named(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainRecipe(**bad)


@pytest.mark.parametrize("bad, message", [
    (dict(amp="fp8"), "amp=fp8; accepted: auto, bf16, fp16, none"),
    (dict(data_path="disk"), "data_path=disk; accepted: auto, device, torchvision"),
    (dict(num_workers=-1), "num_workers=-1; accepted: >= 0"),
])
def test_bad_execution_values_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        Execution(**bad)


def test_unknown_recipe_key_is_named():
    with pytest.raises(ValueError, match=r"^lr_decay=0.1; accepted: batch_size"):
        TrainRecipe.from_dict({"lr_decay": 0.1})
    with pytest.raises(ValueError, match=r"^epochs=3; accepted: amp"):
        Execution.from_dict({"epochs": 3})


def test_schedules():
    step = lr_factor(TrainRecipe(epochs=4, schedule="step", milestones=(0.5, 3), gamma=0.1), 10)
    assert [step(s) for s in (0, 19, 20, 29, 30, 39)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = lr_factor(TrainRecipe(epochs=4, schedule="cosine", warmup_epochs=1), 10)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0) and cos(25) == pytest.approx(0.5) and cos(39) < 0.01


# --- baseline cache -----------------------------------------------------------------------------------
TINY = {"stage_widths": (4, 8, 16)}


def test_trained_baseline_second_call_is_a_cache_hit(data, tmp_path, monkeypatch, caplog):
    train_set, test_set = data[0].sample(64, 0), data[1]
    recipe = TrainRecipe(epochs=1, **FAST)
    with caplog.at_level(logging.INFO, logger="qsfm_cli.baseline"):
        first = trained_baseline("resnet8", 10, train_set, test_set, recipe, seed=0, device="cpu",
                                 cache_dir=tmp_path, model_kwargs=TINY, progress=False)
    assert "cache miss" in caplog.text
    files = list((tmp_path / "baselines").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("resnet8-fake-")
    assert not list((tmp_path / "baselines").rglob(STATE_FILE))

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(baseline_mod, "train", no_training)
    caplog.clear()
    # The execution changes the speed, not the weights: it is not part of the key.
    with caplog.at_level(logging.INFO, logger="qsfm_cli.baseline"):
        second = trained_baseline("resnet8", 10, train_set, test_set, recipe, seed=0, device="cpu",
                                  cache_dir=tmp_path, model_kwargs=TINY, progress=False,
                                  execution=Execution(channels_last=False, eval_every=0))
    assert "cache hit" in caplog.text
    assert_same_weights(weights(first), weights(second))


def test_baseline_key_covers_data_recipe_and_seed(data):
    train_set = data[0]
    recipe = TrainRecipe(epochs=1)
    key = baseline_mod.baseline_key("resnet20", 10, train_set, recipe, seed=0)
    other_images = replace(train_set, images=train_set.images.flip(0))
    assert key != baseline_mod.baseline_key("resnet20", 10, other_images, recipe, seed=0)
    assert key != baseline_mod.baseline_key("resnet20", 10, train_set, replace(recipe, lr=0.1), seed=0)
    assert key != baseline_mod.baseline_key("resnet20", 10, train_set, recipe, seed=1)


# --- loaders ------------------------------------------------------------------------------------------

def _to_uint8(x: torch.Tensor, ds: ImageSet) -> torch.Tensor:
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return (x * std * 255 + mean * 255).round().clamp(0, 255).to(torch.uint8)


def _all_crops(ds: ImageSet, pad: int = 4) -> torch.Tensor:
    """Every crop and flip of every image: ``[N, (2*pad+1)**2 * 2, C, H, W]``."""
    h, w = ds.images.shape[2:]
    padded = torch.nn.functional.pad(ds.images, (pad,) * 4)
    crops = [padded[:, :, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    crops += [c.flip(3) for c in crops]
    return torch.stack(crops, 1)


def test_device_loader_augments_real_crops_and_flips(data):
    ds = data[0].sample(48, 0)
    loader = DeviceLoader(ds, 16, train=True, seed=0)
    batches = list(loader.iter_epoch(0))
    assert len(batches) == 3 and all(x.shape == (16, 3, 16, 16) and x.dtype == torch.float32 for x, _ in batches)
    crops = _all_crops(ds)
    found = []
    for x, y in batches:
        for img, label in zip(_to_uint8(x, ds), y):
            hits = (crops == img).flatten(2).all(2).nonzero()
            assert len(hits), "an output is not a crop/flip of any input"
            n, which = hits[0].tolist()
            assert ds.labels[n] == label
            found.append((n, which))
    assert sorted(n for n, _ in found) == list(range(48))          # a permutation of the epoch
    assert len({w % 81 for _, w in found}) > 10                    # offsets vary
    assert {w >= 81 for _, w in found} == {True, False}           # both flipped and not


def test_device_loader_is_a_function_of_seed_and_epoch(data):
    ds = data[0]
    loader = DeviceLoader(ds, 32, train=True, seed=4)
    first = list(loader.iter_epoch(2))
    again = list(DeviceLoader(ds, 32, train=True, seed=4).iter_epoch(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], next(loader.iter_epoch(3))[0])
    tail = list(loader.iter_epoch(2, start_batch=4))
    assert len(tail) == len(first) - 4 and all(torch.equal(a[0], b[0]) for a, b in zip(first[4:], tail))
    iterated = [next(iter(loader))[0] for _ in range(2)]           # plain iteration walks epochs 0, 1
    assert torch.equal(iterated[1], next(loader.iter_epoch(1))[0])


def test_eval_mode_is_plain_normalization_in_order(data):
    ds = data[1]
    x, y = next(iter(DeviceLoader(ds, 20, train=False)))
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    torch.testing.assert_close(x, (ds.images[:20].float() / 255 - mean) / std)
    assert torch.equal(y, ds.labels[:20])
    batches = list(DeviceLoader(ds, 20, train=False, drop_last=False))
    assert [len(b[1]) for b in batches] == [20, 20, 20, 4]


def test_channels_last_output(data):
    x, _ = next(iter(DeviceLoader(data[0], 8, train=True, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(iter(DeviceLoader(data[0], 8, train=True)))
    assert x.is_contiguous()


def test_torchvision_loader_has_the_same_contract(data):
    train_set, test_set = data
    plain = TorchvisionLoader(test_set, 16, train=False, num_workers=0)
    fast = DeviceLoader(test_set, 16, train=False)
    for (a, ya), (b, yb) in zip(plain.iter_epoch(0), fast.iter_epoch(0), strict=True):
        torch.testing.assert_close(a, b)
        assert torch.equal(ya, yb)
    aug = TorchvisionLoader(train_set, 32, train=True, seed=2, num_workers=0, drop_last=True)
    epoch = list(aug.iter_epoch(1))
    assert len(epoch) == len(aug) == 6 and epoch[0][0].shape == (32, 3, 16, 16)
    tail = list(aug.iter_epoch(1, start_batch=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch[4:], tail, strict=True))
    assert not torch.equal(epoch[0][0], next(aug.iter_epoch(2))[0])
    assert not torch.equal(epoch[0][0], next(plain.iter_epoch(0))[0])  # really augmented/shuffled


def test_make_loader_picks_and_rejects(data):
    assert isinstance(make_loader(data[0], 8, device="cpu", train=True), DeviceLoader)
    assert isinstance(make_loader(data[0], 8, device="cpu", train=True, path="torchvision", num_workers=0),
                      TorchvisionLoader)
    with pytest.raises(ValueError, match="^execution.data_path=ram; accepted: auto, device, torchvision$"):
        make_loader(data[0], 8, device="cpu", train=True, path="ram")


def test_training_through_the_torchvision_path(data):
    recipe = TrainRecipe(epochs=1, **FAST)
    result = train(tiny_net(), *data, recipe, device="cpu", seed=0, progress=False,
                   execution=Execution(data_path="torchvision", num_workers=0))
    assert math.isfinite(result.history[0]["loss"]) and result.test_top1 is not None
