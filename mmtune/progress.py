"""The training progress bar: Lightning's, except under `max_steps`, where it counts steps.

Lightning's rich bar says `Epoch 0/19` from `max_epochs` even when `max_steps` ends the fit (and
`Epoch 0/-2` with `max_epochs: -1`); here the description is `Epoch 0 · step 5/20` then."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


def _by_steps(trainer) -> bool:
    return bool(trainer.max_steps and trainer.max_steps > 0)


def _step_text(trainer, current_epoch: int) -> str:
    return f"Epoch {current_epoch} · step {trainer.global_step}/{trainer.max_steps}"


class StepRichProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        if not _by_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return _step_text(self.trainer, current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _by_steps(trainer) and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, description=_step_text(trainer, trainer.current_epoch))


class StepTQDMProgressBar(TQDMProgressBar):
    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _by_steps(trainer) and self.train_progress_bar is not None:
            self.train_progress_bar.set_description(_step_text(trainer, trainer.current_epoch))


def progress_bar():
    """The bar Lightning would pick (rich when installed), counting steps under max_steps."""
    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
