"""``tensorboard``: event files for TensorBoard, one subdirectory per run under one experiment directory,
so that ``tensorboard --logdir SAVE_DIR/EXPERIMENT`` shows a sweep's jobs side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Logger, copy_into, register_logger, safe_dirname, unique_dir


@register_logger
class TensorBoardLogger(Logger):
    """Scalars per step, the parameters as a text table, the final record as scalars at step 0 and as
    the HParams dashboard's row of the run; artifacts are copied into the run's ``artifacts/``.

    Runs go to ``save_dir/experiment_name/<run name>`` (``-1``, ``-2``... appended when a run of that
    name is already there, so repeated sweeps do not mix their events).
    """

    name = "tensorboard"

    def __init__(self, save_dir: str | Path = "outputs/tensorboard", experiment_name: str = "qsfm"):
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (fails here, not mid-run, if missing)

        self.save_dir = Path(save_dir)
        self.experiment_name = experiment_name
        self.log_dir: Path | None = None
        self._params: dict[str, Any] = {}

    def _start(self, run_name: str, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = unique_dir(self.save_dir / safe_dirname(self.experiment_name), safe_dirname(run_name))
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._params = params
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("params", f"| parameter | value |\n|---|---|\n{rows}", global_step=0)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def _log_record(self, values: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=0)
        # Written into this run's own event file: SummaryWriter.add_hparams would open a new subdirectory,
        # a second "run" per job.
        for summary in hparams(self._params, values):
            self.writer.file_writer.add_summary(summary)

    def _log_artifact(self, path: Path) -> None:
        copy_into(path, self.log_dir / "artifacts")

    def _close(self, status: str) -> None:
        self.writer.add_text("status", status, global_step=0)
        self.writer.close()
