"""A callback that writes the dataset index of every training row each epoch sees (one line per epoch)."""

import json

from lightning.pytorch.callbacks import Callback


class RecordRows(Callback):
    def __init__(self, path: str) -> None:
        self.out, self.epochs = path, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epochs.setdefault(trainer.current_epoch, []).append(batch["index"].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.out, "w") as f:
            json.dump(self.epochs, f)


class AppendRows(Callback):
    """Appends one JSON line per trained batch ({"epoch", "batch", "step", "rows"}) as soon as its step ends,
    so a process killed mid-epoch leaves the record of every batch it trained."""

    def __init__(self, path: str) -> None:
        self.out = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.out, "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step,
                                "rows": batch["index"].tolist()}) + "\n")
