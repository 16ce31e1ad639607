"""docs/extending.md's steps, followed as written: a scorer and a recovery added as one module and one YAML
each (here in a temporary folder, beside the package's own), then run end to end through the config."""
import importlib.util
import json
import sys

import pytest
from hydra import compose, initialize_config_dir

from qsfm_cli import config
from qsfm_cli.app import build_experiment, config_dir
from qsfm_cli.pipeline import run_experiment
from qsfm_cli.recover.base import RECOVERIES
from qsfm_cli.scoring.base import SCORERS

SCORER = '''
from dataclasses import dataclass

import torch

from qsfm_cli.scoring.base import FilterScorer, register_scorer


@register_scorer
@dataclass(frozen=True)
class LastFirst(FilterScorer):
    """Removes the filters with the highest index first, whatever their weights."""

    name = "last_first"
    offset: float = 0.0

    def importance(self, filters: torch.Tensor) -> torch.Tensor:
        return -torch.arange(len(filters), dtype=torch.float64) + self.offset
'''

RECOVERY = '''
from dataclasses import dataclass

from qsfm_cli.recover.base import Recovery, register_recovery
from qsfm_cli.types import SetStatus


@register_recovery
@dataclass(frozen=True)
class Mark(Recovery):
    """Changes no weight; says for every set that it looked at it."""

    name = "mark"
    calibration_images = 8
    word: str = "seen"

    def refit(self, original, pruned, sets, keep, images, *, seed, device="cpu", progress=False):
        return {s.name: SetStatus(True, self.word) for s in sets}
'''


def add_module(tmp_path, name: str, source: str) -> None:
    """What the package's auto-import does for a file of its own folder."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


@pytest.mark.slow
def test_a_scorer_and_a_recovery_added_by_the_documented_steps_run_end_to_end(tmp_path):
    conf = tmp_path / "conf"
    (conf / "scorer").mkdir(parents=True)
    (conf / "recover").mkdir()
    (conf / "scorer" / "last_first.yaml").write_text(
        "# Highest index first.\ndefaults:\n  - /schema/scorer/last_first@_here_\n  - _self_\n")
    (conf / "recover" / "mark.yaml").write_text(
        "# Marks every set.\ndefaults:\n  - /schema/recover/mark@_here_\n  - _self_\n\nword: looked\n")
    with SCORERS.scratch(), RECOVERIES.scratch():
        add_module(tmp_path, "qsfm_test_last_first", SCORER)
        add_module(tmp_path, "qsfm_test_mark", RECOVERY)
        config.register()      # what importing qsfm_cli.app does once every module of the package is in
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[
                "experiment=smoke", f"hydra.searchpath=[file://{conf}]", "scorer=last_first", "recover=mark",
                f"cache.dir={tmp_path / 'cache'}", "eval.latency_batches=[]"])
        exp = build_experiment(cfg, tmp_path / "run")
        run_experiment(exp)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["settings"]["scorer"] == {"name": "last_first", "offset": 0.0}
    assert record["settings"]["recovery"] == "mark"
    assert set(record["results"]["recovery"].values()) == {"looked"}
    for name, kept in record["results"]["kept_channels"].items():
        assert 0 < kept["kept"] < kept["total"], name
