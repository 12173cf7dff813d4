"""Callbacks every task attaches: epoch seeding (exact resume) and the run's metrics.json."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class EpochSeed(Callback):
    """Reseeds every RNG at each training epoch start from (seed, epoch, rank).

    Lightning does not restore RNG state on resume, so a resumed run would draw other
    augmentations and dropout masks than the uninterrupted one. Seeding per epoch makes epoch e
    identical whether or not the run was restarted before it.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        seed = (base * 1_000_003 + trainer.current_epoch * 1_009 + trainer.global_rank) % (2**31 - 1)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


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
        if not trainer.is_global_zero or not trainer.log_dir:
            return
        path = Path(trainer.log_dir) / "metrics.json"
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
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            extra.update(best_model_path=ckpt.best_model_path or None, best_score=_scalar(ckpt.best_model_score),
                         monitor=ckpt.monitor, last_model_path=ckpt.last_model_path or None)
        self._write(trainer, pl_module, "fit", extra)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test", {"ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None})
