"""The callback inside a trial's own `mmtune fit` process: reports the objective at every validation
to the study, asks the pruner, stops the fit when the trial is pruned, and writes the values to
`trial.json` for the sweep process to read back.

Why not `optuna_integration.PyTorchLightningPruningCallback`: it is not installed with optuna, it
needs the `Trial` object of the process that asked for it (a trial here is its own process, launched
by the sweep), and under DDP it needs an RDB storage. This one opens the study by name in the shared
storage and the trial by its id, reports from rank 0 and broadcasts the decision to every rank.

The trial is named by the environment variable `MMTUNE_TUNE_TRIAL` (JSON), not by callback arguments,
so a storage URL with a password never lands in the run's saved config.yaml. Without it the callback
does nothing (e.g. a trial's config run again by hand).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from mmtune.errors import ConfigError
from mmtune.files import write_text_atomic

TRIAL_ENV = "MMTUNE_TUNE_TRIAL"
CALLBACK_PATH = "mmtune.tune.reporter.TrialReporter"


class TrialReporter(Callback):
    """Reports the monitored metric of each validation to the trial and applies the pruner."""

    def __init__(self) -> None:
        raw = os.environ.get(TRIAL_ENV)
        self.job: Optional[dict] = json.loads(raw) if raw else None
        self.values: list[float] = []
        self._trial = None
        first_rank = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"
        if self.job is not None and self.job.get("parent_pid") and first_rank:
            threading.Thread(target=_exit_with_parent, args=(int(self.job["parent_pid"]),), daemon=True).start()

    def _open_trial(self):
        if self._trial is None:
            import optuna

            from mmtune.tune.storage import open_storage
            from mmtune.tune.study import build_pruner

            study = optuna.load_study(study_name=self.job["study"], storage=open_storage(self.job["storage"]),
                                      pruner=build_pruner(self.job["pruner"]))
            self._trial = optuna.trial.Trial(study, self.job["trial_id"])
        return self._trial

    def _write(self, **extra) -> None:
        data = {"metric": self.job["metric"], "values": self.values, **extra}
        write_text_atomic(Path(self.job["result"]), json.dumps(data, indent=1))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.job is None or trainer.sanity_checking:
            return
        metric = self.job["metric"]
        logged = trainer.callback_metrics
        if metric not in logged:
            names = sorted(k for k in logged if not k.startswith("train"))
            if trainer.is_global_zero:
                self._write(missing_metric=True, logged=names)
            raise ConfigError(f"tune: the task never logs metric {metric!r} at validation; it logs: "
                              f"{', '.join(names) or 'nothing'} (set `metric:` in the search file)")
        value = float(logged[metric])
        prune = False
        if trainer.is_global_zero:
            self.values.append(value)
            if math.isfinite(value):
                trial = self._open_trial()
                trial.report(value, len(self.values))
                prune = bool(trial.should_prune())
            self._write(pruned=prune)
        if trainer.world_size > 1:
            prune = trainer.strategy.broadcast(prune)
        if prune:
            trainer.should_stop = True


def _exit_with_parent(parent_pid: int) -> None:
    """Ends the trial when the sweep process is gone (`kill -9` of the sweep): an orphaned trial would
    go on using the machine and writing into a run the study has already given up on. On Linux the
    launcher (`mmtune.tune.runner.LAUNCHER`) already has the kernel kill it; this covers other systems.
    Ranks other than the first are ended by Lightning when the first one dies."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(3)
