"""Callbacks that make faults happen at a chosen global step: NaN pixels in a batch, a NaN module output,
a SIGTERM to the fit's own process. Each records the sample ids of the batch it hit."""

import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _record(path, trainer, batch) -> None:
    if path:
        hits = json.loads(Path(path).read_text()) if Path(path).is_file() else []
        hits.append({"global_step": trainer.global_step, "sample_id": list(batch["sample_id"])})
        Path(path).write_text(json.dumps(hits))


class NanPixelsAt(Callback):
    """Puts a NaN into the first image of the batches of the given global steps (a broken data row)."""

    def __init__(self, steps: list[int], record: str = "") -> None:
        self.steps, self.record = list(steps), record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch["pixels"][0, 0, 0, 0] = float("nan")
            _record(self.record, trainer, batch)


class NanOutputAt(Callback):
    """Makes the task's activations NaN during the batch of one global step (any task, whichever path its
    loss takes: the full logits of `forward`, or the hidden states a chunked LM loss projects itself)."""

    def __init__(self, step: int, record: str = "") -> None:
        self.step, self.record, self._hooks = step, record, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            def poison(module, args, out):
                return out * float("nan") if isinstance(out, torch.Tensor) and out.is_floating_point() else out

            self._hooks = [m.register_forward_hook(poison) for m in pl_module.modules()]
            _record(self.record, trainer, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class SigtermAt(Callback):
    """Sends SIGTERM to its own process at the start of one global step, as a cluster does before it
    takes the machine back."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
