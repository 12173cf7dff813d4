"""Callbacks every task attaches: per-step seeding (exact resume) and the run's metrics.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mmtune.data.samplers import seed_everything_from


class StepSeed(Callback):
    """Reseeds every RNG before each training step from (seed, global step, rank).

    Lightning does not restore RNG state on resume, so a resumed run would draw other dropout and
    drop-path masks than the uninterrupted one. Seeding per step makes step n identical whether or
    not the run was restarted before it (data augmentation is seeded per sample by the data module).
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        seed_everything_from(int(os.environ.get("PL_GLOBAL_SEED", "0")), trainer.global_step, trainer.global_rank,
                             accelerators=True)


def _scalar(value: Any) -> Optional[float]:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


class RunSummary(Callback):
    """Writes `metrics.json` in the run directory (rank 0 only): the best checkpoint, its score and the
    final metrics of fit, plus the metrics of each validate/test call, and the parameter counts."""

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, key: str, extra: Optional[dict] = None) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir:
            return
        path = Path(log_dir) / "metrics.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        metrics = {k: v for k, v in ((k, _scalar(v)) for k, v in trainer.callback_metrics.items()) if v is not None}
        entry = {"metrics": dict(sorted(metrics.items())), **(extra or {})}
        report = getattr(pl_module, "adapter_report", None)
        if report is not None:
            data["parameters"] = {"trainable": report.trainable, "total": report.total, "adapted_modules": len(report.adapted)}
        data[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        extra = {"epochs": trainer.current_epoch, "global_step": trainer.global_step}
        for ckpt in trainer.checkpoint_callbacks:
            if ckpt.monitor:
                extra.update(best_model_path=ckpt.best_model_path or None, best_score=_scalar(ckpt.best_model_score),
                             monitor=ckpt.monitor)
            else:
                extra.update(last_model_path=ckpt.best_model_path or None)
        self._write(trainer, pl_module, "fit", extra)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test", {"ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None})
