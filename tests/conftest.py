from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_ROOT = SHARED / "data"
CHECKPOINTS = SHARED / "checkpoints"


def shared_file(*parts: str) -> Path:
    """A file of ../shared, or skip the test: a user's clone does not have it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} absent (real data lives only in the development workspace)")
    return path


def qsfm_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``qsfm-run ARGS`` in ``cwd``, as a user runs it: a process of its own, output captured."""
    return subprocess.run([sys.executable, "-m", "qsfm_cli.app", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def assert_png(path: Path) -> None:
    """A real PNG image of some size, not an empty or broken file."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 100 and image.shape[1] > 100
