"""Data-parallel training: per-rank shards of both loaders, DDP fine-tuning on the CPU with Gloo and two
processes (same weights as one process with the same global batch, one writer, SIGTERM + resume), and the
Hydra side (every rank resolves rank 0's run directory; only rank 0 writes .hydra/ and the log)."""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from qsfm_cli import distributed
from qsfm_cli import train as train_mod
from qsfm_cli.data import load_dataset
from qsfm_cli.loaders import DeviceLoader, TorchvisionLoader, shard_positions
from qsfm_cli.models import create_model
from qsfm_cli.train import LOG_FILE, STATE_FILE, Execution, TrainRecipe, train

from .conftest import HANG_GUARD_S, SignalAt
from .test_sweep import no_submission, sbatch_of  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = TrainRecipe(epochs=2, batch_size=16, lr=0.05, weight_decay=5e-4, momentum=0.9, schedule="cosine")
EXECUTION = Execution(amp="none", channels_last=False)


def data():
    return load_dataset("fake", size=12, train_size=96, test_size=40, seed=0)


def net(sigterm_at: int | None = None) -> nn.Module:
    """No BatchNorm or dropout (their per-rank statistics and masks legitimately differ from one process),
    and an optional SIGTERM to this process at the n-th training forward."""
    torch.manual_seed(0)
    return SignalAt(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                  nn.Linear(128, 10)), sigterm_at, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: an uninterrupted run into a run dir of its own, then a run that rank 1 alone gets a
    SIGTERM in, resumed, both in one shared run dir."""
    os.environ.update(_launcher_env(rank, world, port))
    torch.set_num_threads(1)
    out_dir = Path(out)
    train_set, test_set = data()
    train(net(), train_set, test_set, RECIPE, execution=EXECUTION, device="cpu", seed=0, run_dir=out_dir / f"own{rank}",
          progress=False)
    train_mod._SYNC_EVERY = 2            # ranks meet every 2 steps: the stop lands mid-epoch
    shared = out_dir / "shared"
    try:
        train(net(sigterm_at=3 if rank == 1 else None), train_set, test_set, RECIPE, execution=EXECUTION, device="cpu",
              seed=0, run_dir=shared, progress=False)
        (out_dir / f"finished{rank}").touch()
    except KeyboardInterrupt as err:
        (out_dir / f"interrupted{rank}").write_text(str(err))
    train(net(), train_set, test_set, RECIPE, execution=EXECUTION, device="cpu", seed=0, run_dir=shared, resume=True,
          progress=False)
    torch.distributed.destroy_process_group()


def _run_ranks(world: int, out: Path, timeout: float = HANG_GUARD_S) -> None:
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {timeout} s")


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / STATE_FILE, weights_only=True)


def _log(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / LOG_FILE) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _run_ranks(2, out)
    single = out / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as each rank: the same float rounding, and a shared machine
    try:
        train(net(), *data(), RECIPE, execution=EXECUTION, device="cpu", seed=0, run_dir=single, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, single


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_same_global_batch(ddp_runs):
    out, single = ddp_runs
    ours, ref = _state(out / "own0")["model"], _state(single)["model"]
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6)
    assert any((ours[n] - net().state_dict()[n]).abs().max() > 1e-3 for n in ref), "training changed nothing"
    for a, b in zip(_log(out / "own0"), _log(single), strict=True):     # metrics summed over both ranks
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["train_top1"]) == pytest.approx(float(b["train_top1"]))
        assert float(a["test_top1"]) == pytest.approx(float(b["test_top1"]))


@pytest.mark.slow
def test_only_rank_0_writes(ddp_runs):
    out, _ = ddp_runs
    assert {p.name for p in (out / "own0").iterdir()} == {STATE_FILE, LOG_FILE}
    assert not (out / "own1").exists() or not any((out / "own1").iterdir())


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_and_resume_matches(ddp_runs):
    out, single = ddp_runs
    assert {p.name for p in out.iterdir() if p.name.startswith(("interrupted", "finished"))} == \
        {"interrupted0", "interrupted1"}
    assert "epoch 1, step 4/6" in (out / "interrupted0").read_text()     # agreed at the next meeting step
    resumed, ref = _state(out / "shared")["model"], _state(single)["model"]
    for name in ref:
        torch.testing.assert_close(resumed[name], ref[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(_log(out / "shared"), _log(single), strict=True):   # the split epoch's sums survive
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["train_top1"]) == pytest.approx(float(b["train_top1"]))


# ------------------------------------------------------------------------------------ shards, no processes
@pytest.mark.parametrize("kind", ["device", "torchvision"])
def test_rank_shards_together_are_the_single_process_batch(kind):
    train_set, test_set = data()

    def loader(ds, train, shard, batch=16):
        if kind == "device":
            return DeviceLoader(ds, batch, train=train, seed=3, drop_last=train, shard=shard)
        return TorchvisionLoader(ds, batch, train=train, seed=3, drop_last=train, num_workers=0, shard=shard)

    one = list(loader(train_set, True, (0, 1)).iter_epoch(1))
    ranks = [list(loader(train_set, True, (r, 2)).iter_epoch(1)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 6
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert x0.shape[0] == x1.shape[0] == 8
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    resumed = list(loader(train_set, True, (1, 2)).iter_epoch(1, start_batch=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ranks[1][4:], resumed, strict=True))
    evals = [torch.cat([y for _, y in loader(test_set, False, (r, 3), batch=7).iter_epoch(0)]) for r in range(3)]
    assert torch.equal(torch.cat(evals), test_set.labels)             # each test image once, in order


@pytest.mark.parametrize("n, batch, world, message", [
    (96, 15, 2, "a training batch of 15 images split over 2 ranks must divide evenly"),
    (10, 4, 1, None),
])
def test_shard_positions_rules(n, batch, world, message):
    if message:
        with pytest.raises(ValueError, match=message):
            shard_positions(n, batch, drop_last=True, train=True, rank=0, world=world)
    else:
        assert shard_positions(n, batch, drop_last=True, train=True).tolist() == list(range(8))
        assert shard_positions(n, batch, drop_last=False, train=True).tolist() == list(range(10))


def test_too_few_images_for_one_global_batch_is_one_line(monkeypatch):
    monkeypatch.setattr(distributed, "init", lambda: distributed.Context(0, 2, 0))
    train_set, _ = data()
    with pytest.raises(ValueError, match="data-parallel training needs at least one full batch: 10 training "
                                         "images, batch_size=16"):
        train(net(), train_set.subset(range(10)), None, RECIPE, execution=EXECUTION, device="cpu", seed=0, progress=False)


def test_cuda_index_other_than_the_local_rank_is_refused():
    ctx = distributed.Context(rank=1, world=2, local_rank=1)
    assert distributed.rank_device("cpu", ctx) == torch.device("cpu")
    assert distributed.rank_device("cuda", ctx) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device=cuda:0 under a multi-process launcher"):
        distributed.rank_device("cuda:0", ctx)


def test_a_submitit_task_joins_with_slurms_rank_and_size(monkeypatch):
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "9",
             "SLURM_LOCALID": "1"}
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                 "MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", {**environ, **slurm})
    monkeypatch.setattr(distributed, "_start_time", None)       # restored: init() sets the shared clock
    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    distributed.init()
    assert joined == ["gloo"]
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == \
        {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07"}


@pytest.mark.slow
def test_multigpu_slurm_launcher_asks_one_task_per_gpu(no_submission, tmp_path):
    sbatch = sbatch_of(no_submission, tmp_path, ["hydra/launcher=slurm_multigpu", "hydra.launcher.nodes=2"],
                       [["seed=0"]])
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=10"):
        assert f"#SBATCH {line}" in sbatch


# ------------------------------------------------------------------------------------------------- Hydra
def test_rank_overrides_and_shared_clock(monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(0, 2, 0))
    assert distributed.hydra_overrides() == []
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(1, 2, 1))
    assert "hydra.output_subdir=null" in distributed.hydra_overrides()
    monkeypatch.setattr(distributed, "_start_time", 1_000_000_000.5)
    assert distributed.shared_now("%Y-%m-%d_%H-%M-%S-%f").endswith("-500000")


RUNNER = """
import sys
from qsfm_cli import app, distributed
distributed.init()
sys.argv += distributed.hydra_overrides()
app.main()
"""


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_dir(tmp_path):
    """Two ranks of ``torchrun -m qsfm_cli.app`` with the bootstrap the app runs (its first two lines), a
    microsecond stamp in the run dir: one directory, one .hydra/, one log written by rank 0."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    weights = tmp_path / "resnet8.pt"   # given weights: a baseline trained under the cache lock would need all ranks
    torch.save(create_model("resnet8", num_classes=10, stage_widths=[4, 8, 16]).state_dict(), weights)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           str(runner), "experiment=smoke", "device=cpu", "save_model=false", "baseline.train=false",
           f"model.checkpoint={weights}", "finetune=short",
           "finetune.epochs=1", "finetune.batch_size=32", "execution.amp=none", f"cache.dir={tmp_path / 'cache'}",
           f"hydra.run.dir={runs}/" + "${qsfm_now:%H-%M-%S-%f}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    names = {p.name for p in run_dir.iterdir()}
    assert {".hydra", "qsfm_run.log", STATE_FILE, LOG_FILE} <= names
    assert "[rank 1]" not in (run_dir / "qsfm_run.log").read_text()
