"""A callback that kills its own process mid-epoch, like an OOM kill or a pre-empted node."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtEpoch(Callback):
    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
