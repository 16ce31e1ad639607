from __future__ import annotations

from pathlib import Path

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
