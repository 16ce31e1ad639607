"""The installed command must find its configs in a regular (wheel) install, not only in a checkout."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # builds and installs a wheel

GROUPS = ("model", "dataset", "scorer", "prune", "recover", "finetune", "experiment")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO)], check=True)
    return next(out.glob("qsfm_cli-*.whl"))


def test_wheel_ships_every_config_group(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "qsfm_cli/conf/config.yaml" in names
    for group in GROUPS:
        assert any(n.startswith(f"qsfm_cli/conf/{group}/") and n.endswith(".yaml") for n in names), group


def test_installed_wheel_composes_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("from qsfm_cli.app import config_dir; import qsfm_cli; "
            "print(config_dir()); print(qsfm_cli.__file__)")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                           capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in found), found
    job = subprocess.run([sys.executable, "-m", "qsfm_cli.app", "experiment=smoke", "--cfg", "job"],
                         cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout
    assert "name: resnet8" in job
