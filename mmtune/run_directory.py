"""What a verb writes into its run directory, and when: nothing until the verb has passed the checks
that can fail (data set up, model built, checkpoint restored and found to fit); then the run's logs,
appended to on a resume, and the resolved config under the verb's own name.

Lightning writes earlier: its setup creates every logger's experiment before the data module, the
model or the checkpoint are looked at, and the CSV logger's experiment deletes an existing
`metrics.csv` ("Previous log files in this directory will be deleted"); `SaveConfigCallback` writes
in `setup` too. So a fit that failed on a checkpoint of another architecture had already deleted
that run's curves, and every failed setup left a `version_N` folder behind. The classes here keep
Lightning's loggers and only move the moment they touch the disk.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any, Optional

import lightning as L
from lightning.fabric.loggers.logger import _DummyExperiment, rank_zero_experiment
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from mmtune.files import atomic_write


class _RunCSVWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps rows in memory until the run is opened, never deletes an
    existing `metrics.csv` and appends to it.

    On a resume, the rows logged after the checkpoint that is resumed from (steps from its global
    step on, written before the run was killed) are dropped: the resumed run logs them again.
    Header changes rewrite the file atomically.
    """

    def __init__(self, log_dir: str, resume_step: Optional[int] = None) -> None:
        # Not ExperimentWriter.__init__: it deletes metrics.csv and creates the folder.
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._resume_step = resume_step
        self._opened = False
        from lightning.fabric.utilities.cloud_io import get_filesystem

        self._fs = get_filesystem(log_dir)

    def open(self) -> None:
        if self._opened:
            return
        self._opened = True
        os.makedirs(self.log_dir, exist_ok=True)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                rows, keys = list(reader), list(reader.fieldnames or [])
            kept = [r for r in rows if self._resume_step is None or not _at_or_after(r, self._resume_step)]
            self.metrics_keys = sorted(keys)
            if len(kept) != len(rows):
                self._write_all(kept)
        if self.hparams:
            save_hparams_to_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        if self._opened:
            save_hparams_to_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)

    def save(self) -> None:
        if self._opened:
            super().save()

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write_all(rows, fieldnames)

    def _write_all(self, rows: list[dict], fieldnames: Optional[list[str]] = None) -> None:
        with atomic_write(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames or self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


def _at_or_after(row: dict, step: int) -> bool:
    try:
        return int(float(row.get("step") or -1)) >= step
    except ValueError:
        return False


class RunCSVLogger(CSVLogger):
    """CSVLogger that writes nothing until `open_run` and appends to the run's `metrics.csv`; its rows
    are flushed at every checkpoint, so a killed run keeps the curves up to its last checkpoint."""

    def __init__(self, save_dir: str, name: str, version, resume_step: Optional[int] = None) -> None:
        super().__init__(save_dir, name=name, version=version)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _RunCSVWriter:
        if self._experiment is None:
            self._experiment = _RunCSVWriter(self.log_dir, self._resume_step)
        return self._experiment

    def open_run(self) -> None:
        if isinstance(self.experiment, _RunCSVWriter):  # rank 0 (others hold a dummy)
            self.experiment.open()

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()


class RunTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger whose event file is created at `open_run`, not at setup. Until then its
    experiment is Lightning's dummy one (what processes other than rank 0 get)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._opened = False

    @property
    def experiment(self):
        if not self._opened:
            return _DummyExperiment()
        return TensorBoardLogger.experiment.fget(self)

    def open_run(self) -> None:
        self._opened = True

    def save(self) -> None:
        if self._opened:
            super().save()


class RunConfigCallback(SaveConfigCallback):
    """Opens the run's loggers and saves the resolved config once the verb has passed its setup: at
    the start of fit, validate, test or predict, after the data, the model and the checkpoint are in
    place (strategies that restore after setup, FSDP, restore later). The config file is named by
    the CLI per verb (`config.yaml` for a new fit, `test_config.yaml`, ...), so no verb replaces
    another's."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage = stage

    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.already_saved:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "open_run"):
                logger.open_run()
        super().setup(trainer, pl_module, getattr(self, "_stage", trainer.state.fn))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._open(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module)


class RunDirLogger(CSVLogger):
    """A logger that writes nothing and only points Lightning at the run directory.

    Lightning takes `trainer.log_dir` (where mmtune writes metrics.json, records, reports) and the
    checkpoint folder from the first logger: an evaluation verb given the user's own logger (MLflow,
    W&B) puts this one first, so those outputs stay in the run folder while the metrics also go to the
    user's tracker. A CSVLogger by type, so Lightning reads its `log_dir` (the run folder itself)."""

    def __init__(self, save_dir: str, name: str, version) -> None:
        super().__init__(save_dir, name=name, version=version)

    @property
    def experiment(self):
        return _DummyExperiment()

    def log_hyperparams(self, params=None, *args, **kwargs) -> None:
        return None

    def log_metrics(self, metrics, step=None) -> None:
        return None

    def save(self) -> None:
        return None

    def finalize(self, status: str) -> None:
        return None


def run_loggers(configured, run_dir, fit: bool, resume_step: Optional[int] = None):
    """The loggers of a verb: mmtune's run-directory ones first (Lightning takes the run folder, where
    checkpoints and metrics.json go, from the first logger), then the user's `trainer.logger` ones
    (MLflow, W&B, a TensorBoard elsewhere, ...) beside them; `false` turns logging off.

    Only fit logs curves into the run folder: evaluation verbs write metrics.json, confusion matrices
    and predictions there, and a CSV logger would add their rows to the fit's metrics.csv; their
    metrics go to the user's loggers only (behind a `RunDirLogger` that keeps the run folder)."""
    if configured is False:
        return False
    given = [] if configured in (None, True) else list(configured) if isinstance(configured, (list, tuple)) \
        else [configured]
    save_dir, name = str(run_dir.parent.parent), run_dir.parent.name
    number = re.fullmatch(r"version_(\d+)", run_dir.name)
    version = int(number.group(1)) if number else run_dir.name  # an int shows as v_num in the progress bar
    if not fit:
        return [RunDirLogger(save_dir, name=name, version=version), *given] if given else False
    ours = [RunCSVLogger(save_dir, name=name, version=version, resume_step=resume_step)]
    if not any(isinstance(logger, TensorBoardLogger) for logger in given):
        ours.append(RunTensorBoardLogger(save_dir, name=name, version=version, default_hp_metric=False))
    return [*ours, *given]


def allow_mlflow_file_store(trainer_cfg) -> None:
    """MLflow 3 refuses its file store (`file:./mlruns`, also its default) unless
    MLFLOW_ALLOW_FILE_STORE is set, although it still reads and writes it; a config that chose an
    MLFlowLogger with a file store gets the opt-out (a user's own setting wins). Called before the
    logger is built."""
    loggers = (trainer_cfg or {}).get("logger") if hasattr(trainer_cfg, "get") else None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not hasattr(logger, "get") or not str(logger.get("class_path", "")).endswith("MLFlowLogger"):
            continue
        init = logger.get("init_args") or {}
        uri = str((init.get("tracking_uri") if hasattr(init, "get") else None) or os.environ.get("MLFLOW_TRACKING_URI", "file:"))
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
