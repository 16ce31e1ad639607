"""Data-parallel training on several GPUs and nodes: torchrun (or submitit) + DistributedDataParallel.

A launcher starts one process per GPU and describes the job in environment variables: torchrun sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; in a job of Hydra's submitit
launcher with several tasks (``hydra/launcher=slurm_multigpu``) submitit's ``TorchDistributedEnvironment``
derives them from the SLURM variables (a hand-written SLURM script runs torchrun on each node instead).
``init()`` joins that process group (NCCL for CUDA tensors, Gloo for CPU ones) and pins each process to its
GPU; without a launcher it is a no-op and everything runs in one process.

Every rank runs the whole pipeline: the pruning stages are deterministic, so each rank builds the same
pruned model (and the shared cache lets them reuse one computation); only fine-tuning splits the work.
Only rank 0 writes files.

Hydra: every rank composes the config itself, so every rank must resolve the same run directory. The run
and sweep directories are stamped with ``${qsfm_now:...}``, Hydra's ``${now:...}`` with rank 0's start
time on every rank; ``hydra_overrides()`` keeps ranks other than 0 from writing ``.hydra/`` and the job log
(their warnings and errors go to the console).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

_start_time: float | None = None   # rank 0's clock at init(), shared by every rank


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Context:
    """The process group joined by ``init()``; a one-process context otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launched() -> bool:
    """Whether a launcher started this process as one of several: torchrun, or submitit on SLURM."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1")) > 1 or (env.get("SUBMITIT_EXECUTOR") == "slurm"
                                                   and int(env.get("SLURM_NTASKS", "1")) > 1)


def init() -> Context:
    """Join the process group the launcher describes (idempotent); a one-process context without one."""
    global _start_time
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if "WORLD_SIZE" not in os.environ:   # a submitit task: derive torch's variables from SLURM's
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    stamp = [time.time()]
    dist.broadcast_object_list(stamp, src=0)
    _start_time = stamp[0]
    return current()


def rank_device(device: str | torch.device, ctx: Context) -> torch.device:
    """This rank's device: under a launcher, ``cuda`` means ``cuda:LOCAL_RANK``; another CUDA index is
    refused (every rank would share that GPU)."""
    device = torch.device(device)
    if not ctx.active or device.type != "cuda":
        return device
    if device.index is not None and device.index != ctx.local_rank:
        raise ValueError(f"device={device} under a multi-process launcher: each rank uses cuda:LOCAL_RANK; "
                         f"pass device=cuda or device=auto")
    return torch.device("cuda", ctx.local_rank)


def wrap(model: nn.Module, device: torch.device, ctx: Context) -> nn.Module:
    """``model`` inside DistributedDataParallel when the job has several ranks (parameters and buffers
    are broadcast from rank 0, gradients averaged); ``model`` itself otherwise."""
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``min``) over the ranks; unchanged in one process."""
    if current().active:
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op])
    return tensor


def barrier() -> None:
    if current().active:
        dist.barrier()


def shared_now(pattern: str) -> str:
    """``${qsfm_now:pattern}``: Hydra's ``${now:pattern}``, with rank 0's start time on every rank."""
    moment = datetime.fromtimestamp(_start_time) if _start_time is not None else datetime.now()
    return moment.strftime(pattern)


# Cached like Hydra's own ``now``: one value per config, which Hydra carries over to the jobs of a sweep.
OmegaConf.register_new_resolver("qsfm_now", shared_now, use_cache=True, replace=True)


def hydra_overrides() -> list[str]:
    """Extra command-line overrides for this rank: none for rank 0 (or one process); for every other
    rank, no ``.hydra/`` copy of the config and no job log file, warnings and errors on the console."""
    ctx = current()
    if ctx.is_main:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING",
            f"hydra.job_logging.formatters.simple.format='[rank {ctx.rank}] %(levelname)s %(message)s'"]


def resolve_device(name: str, slot: int = 0) -> torch.device:
    """``auto`` picks CUDA when available, GPU ``slot`` mod the number of GPUs (job k of a sweep whose jobs
    run at once on one machine takes GPU k mod n); anything else must name a usable torch device."""
    if name == "auto":
        return torch.device(f"cuda:{slot % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ValueError(f"device {name!r} requested but {device.type} is not available; accepted here: auto, cpu")
    return device
