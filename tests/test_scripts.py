"""Every script in scripts/ imports on the current code and answers ``--help`` with its usage, exit code 0."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import HANG_GUARD_S

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PYTHON = sorted(SCRIPTS.glob("*.py"))
SHELL = sorted(SCRIPTS.glob("*.sh"))


def test_the_scripts_are_found():
    assert "bench_recover.py" in {p.name for p in PYTHON} and "scorer_table.sh" in {p.name for p in SHELL}


@pytest.mark.parametrize("script", PYTHON, ids=lambda p: p.name)
def test_python_script_imports_and_prints_help(script, monkeypatch, capsys):
    """In this process (cheap): the script's imports resolve and its argument parser answers ``--help``."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", SHELL, ids=lambda p: p.name)
def test_shell_script_prints_help(script, tmp_path):
    """``bash scripts/x.sh --help`` from another directory: exit 0, its usage, nothing run (no file written).
    (The Python scripts are run in-process above: a process each would import torch a dozen times.)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPTS.parent),
                                                                    os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(["bash", str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert str(script.name) in proc.stdout or "usage" in proc.stdout.lower()
    assert list(tmp_path.iterdir()) == []
