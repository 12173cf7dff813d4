"""Checkpoints written crash-safely: the whole file goes to a temporary file beside the checkpoint,
is synced, then renamed over it, so a kill or a full disk during a save leaves the previous
checkpoint whole and loadable.

Lightning 2.6's `TorchCheckpointIO` serializes into memory and writes through an fsspec transaction,
whose local temporary file is made in the system temp folder (`tempfile.mkstemp`) and moved with
`shutil.move`. When the run directory is on another filesystem than /tmp (a cluster's shared disk,
the common case), that move is a copy over the checkpoint in place: not atomic. It also holds a
second full copy of the checkpoint in memory and can fill /tmp. Writing beside the target keeps the
rename on one filesystem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmtune.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic (remote URLs keep Lightning's own path)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(Path(path), "wb") as f:
            torch.save(checkpoint, f)


class CrashSafeCheckpoints(Callback):
    """Puts `AtomicCheckpointIO` in place of Lightning's default checkpoint writer before anything is
    saved. A writer the user chose (a plugin, a strategy's own, async or XLA) is left alone."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
