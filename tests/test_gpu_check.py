"""``scripts/gpu_check.sh --dry`` runs every step of the GPU check at toy sizes on the CPU, so it cannot rot."""
import subprocess
from pathlib import Path

import pytest

from .conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # every step of the check, each in processes of its own


def test_gpu_check_dry_run_passes_every_step():
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry"], cwd=ROOT, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert len(rows) == 5, proc.stdout
    assert "aggregate: 1 jobs" in proc.stdout and "device / torchvision:" in proc.stdout
