from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_ROOT = SHARED / "data"
CHECKPOINTS = SHARED / "checkpoints"
# Every time limit of a test: one that only a hung process reaches, however busy the machine (a suite of
# subprocess runs took over ten times its idle time on two shared cores), never a speed claim.
HANG_GUARD_S = 1800


def shared_file(*parts: str) -> Path:
    """A file of ../shared, or skip the test: a user's clone does not have it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} absent (real data lives only in the development workspace)")
    return path


def qsfm_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``qsfm-run ARGS`` in ``cwd``, as a user runs it: a process of its own, output captured."""
    return subprocess.run([sys.executable, "-m", "qsfm_cli.app", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def qsfm_run_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """``qsfm-run ARGS`` in this process (no interpreter start-up): its exit code and its stderr lines."""
    from hydra.core.global_hydra import GlobalHydra

    from qsfm_cli import app

    monkeypatch.setattr(sys, "argv", ["qsfm-run", *args])
    try:
        with pytest.raises(SystemExit) as stop:
            app.main()
    finally:
        GlobalHydra.instance().clear()
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def assert_png(path: Path) -> None:
    """A real PNG image of some size, not an empty or broken file."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 100 and image.shape[1] > 100


class SignalAt(nn.Module):
    """``net``, sending this process ``signum`` at its ``at``-th training forward (``None``: never): a Ctrl-C,
    a SIGTERM or a job manager's signal in the middle of an epoch."""

    def __init__(self, net: nn.Module, at: int | None = None, signum: int = signal.SIGINT):
        super().__init__()
        self.net, self.at, self.signum, self.calls = net, at, signum, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(self.signum)
        return self.net(x)


@pytest.fixture
def scratch_models(monkeypatch):
    """Models (and weight cards) a test registers are gone after it."""
    import qsfm_cli.models.base as models_base

    monkeypatch.setattr(models_base, "_CARDS", dict(models_base._CARDS))
    with models_base.MODELS.scratch():
        yield


def macs_clock(monkeypatch) -> None:
    """Latency tables time every layer and network as its MACs in millions: a deterministic stand-in for
    the clock, under which a table predicts exactly what the MACs count says."""
    from qsfm_cli import latency_table
    from qsfm_cli.counting import count_macs

    def time_shapes(shapes, groups, **_):
        return {sig: count_macs(module, (1, *shape)) / 1e6 for sig, (module, shape) in shapes.items()}

    def time_network(model, example, **_):
        return count_macs(model, tuple(example.shape)) / 1e6, 0.0

    monkeypatch.setattr(latency_table, "_time_shapes", time_shapes)
    monkeypatch.setattr(latency_table, "_time_network", time_network)
