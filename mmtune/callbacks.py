"""Callbacks every task attaches: per-step seeding and the loader's position (exact resume), validation at a
step limit, and the run's metrics.json."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mmtune.data.samplers import seed_everything_from
from mmtune.files import read_json, write_text_atomic


class StepSeed(Callback):
    """Reseeds every RNG before each training step from (seed, global step, rank).

    Lightning does not restore RNG state on resume, so a resumed run would draw other dropout and
    drop-path masks than the uninterrupted one. Seeding per step makes step n identical whether or
    not the run was restarted before it (data augmentation is seeded per sample by the data module).
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        seed_everything_from(int(os.environ.get("PL_GLOBAL_SEED", "0")), trainer.global_step, trainer.global_rank,
                             accelerators=True)


class ResumeLoaderPosition(Callback):
    """Gives a mid-epoch checkpoint's loader position back to the training loader when a fit resumes, so
    the epoch goes on with the next batch instead of starting over: any loader with a state
    (`ResumableLoader`, litdata's `StreamingDataLoader`), as Lightning itself would.

    Lightning hands loader states back only if it builds the train loader after restoring the
    checkpoint, but `trainer.estimated_stepping_batches` (the schedule's length, asked for in
    `configure_optimizers`) builds it before, and the state is then dropped. The loader starts
    drawing at its first batch, after `on_train_start`, so setting the position here is in time.
    """

    def __init__(self) -> None:
        self._states: Optional[list] = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        self._states = (fit_loop.get("state_dict") or {}).get("combined_loader")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._states = self._states, None
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else list(loaders) if isinstance(
            loaders, (list, tuple)) else [loaders]
        if states and len(states) == len(loaders):
            for loader, state in zip(loaders, states):
                if callable(getattr(loader, "load_state_dict", None)) and callable(getattr(loader, "state_dict", None)):
                    loader.load_state_dict(state)
class ValidateAtStepLimit(Callback):
    """Validates when `max_steps` stops the fit in the middle of an epoch.

    Lightning validates at epoch ends; a `max_steps` shorter than an epoch (a common smoke test) ends
    the fit before any validation, and the best checkpoint and early stopping then fail on a missing
    `val/...` metric. Asking the loop to stop at the step limit makes it validate first (Lightning
    validates before stopping on `trainer.should_stop`), so the fit ends validated and saved.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _checkpoint_position(path: Optional[str]) -> dict:
    """The epoch and global step a checkpoint was saved at (read from the file, weights mapped lazily)."""
    if not path or not Path(path).is_file():
        return {}
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 (a checkpoint this run wrote; its position is a nicety, not a must)
        return {}
    return {"best_epoch": ckpt.get("epoch"), "best_step": ckpt.get("global_step")}


class RunSummary(Callback):
    """Writes `metrics.json` in the run directory (rank 0 only): the best checkpoint (path, score, the
    epoch and step it was saved at) and the final metrics of fit, the metrics of each validate/test
    call, the wall time of each verb, and the parameter counts. A fit that stops on an exception (a
    crash, Ctrl-C) still writes its `fit` entry, marked `interrupted`."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def _start(self, key: str) -> None:
        self._started[key] = time.monotonic()

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, key: str, extra: Optional[dict] = None,
               log_dir: Optional[str] = None) -> None:
        log_dir = log_dir or trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir:
            return
        path = Path(log_dir) / "metrics.json"
        data = read_json(path, {})
        metrics = {k: v for k, v in ((k, _scalar(v)) for k, v in trainer.callback_metrics.items()) if v is not None}
        entry = {"metrics": dict(sorted(metrics.items())), **(extra or {})}
        if key in self._started:
            entry["wall_time_s"] = round(time.monotonic() - self._started[key], 3)
        report = getattr(pl_module, "adapter_report", None)
        if report is not None:
            data["parameters"] = {"trainable": report.trainable, "total": report.total, "adapted_modules": len(report.adapted)}
        data[key] = entry
        write_text_atomic(path, json.dumps(data, indent=2))

    def _fit_extra(self, trainer: L.Trainer) -> dict:
        extra = {"epochs": trainer.current_epoch, "global_step": trainer.global_step}
        for ckpt in trainer.checkpoint_callbacks:
            if ckpt.monitor:
                extra.update(best_model_path=ckpt.best_model_path or None, best_score=_scalar(ckpt.best_model_score),
                             monitor=ckpt.monitor, **_checkpoint_position(ckpt.best_model_path))
            else:
                extra.update(last_model_path=ckpt.best_model_path or None)
        for callback in trainer.callbacks:  # e.g. mmtune.faults.NonFiniteGuard: batches skipped
            if callable(getattr(callback, "fit_summary", None)):
                extra.update(callback.fit_summary())
        return extra

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("fit")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "fit", self._fit_extra(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or "fit" not in self._started:
            return
        # Only the failing process gets here: no collective (trainer.log_dir broadcasts), rank 0's own folder.
        local = trainer.loggers[0].log_dir if trainer.loggers else trainer.default_root_dir
        self._write(trainer, pl_module, "fit", {**self._fit_extra(trainer), "interrupted": True,
                                                "error": f"{type(exception).__name__}: {exception}"[:500]},
                    log_dir=local)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._start("validate")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test", {"ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None})

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "predict", {"ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None})
