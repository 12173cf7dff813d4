"""The start-of-run summary printed once (rank 0) when a fit starts, in place of Lightning's device
banners, model summary table and tips: what is trained, on how much data, where, and where it is
written."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L

SPLITS = ("train", "val", "test")


def _split_sizes(trainer: L.Trainer) -> dict[str, int]:
    """Samples per split: the data module's `splits` (mmtune's data modules keep them), else the
    lengths of the dataloaders Lightning has loaded by now."""
    splits = getattr(trainer.datamodule, "splits", None)
    if isinstance(splits, dict) and splits:
        return {name: len(splits[name]) for name in SPLITS if splits.get(name) is not None}
    sizes = {}
    loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
    for name, loader in loaders.items():
        loaders_of = loader if isinstance(loader, (list, tuple)) else [loader]
        try:
            sizes[name] = sum(len(dl.dataset) for dl in loaders_of if dl is not None)
        except TypeError:  # an iterable dataset has no length
            continue
    return {k: v for k, v in sizes.items() if v}


def summary_lines(trainer: L.Trainer, module: L.LightningModule, run_dir: Optional[Path]) -> list[str]:
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    spec = getattr(module, "model_spec", None)
    model = getattr(spec, "name", None) or type(getattr(module, "net", module)).__name__
    share = f" ({trainable / total:.2%})" if total else ""
    sizes = _split_sizes(trainer)
    data = ", ".join(f"{name} {n:,}" for name, n in sizes.items()) or "sizes unknown"
    devices = f"{trainer.num_devices} x {type(trainer.accelerator).__name__.replace('Accelerator', '').lower()}"
    stop = f"max_steps {trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else \
        f"max_epochs {trainer.max_epochs}"
    lines = [f"[mmtune] fit {type(module).__name__}: {model}; parameters {trainable:,} trainable / {total:,}{share}",
             f"[mmtune] data: {data} samples; {devices}, precision {trainer.precision}, {stop}"]
    if run_dir is not None:
        lines.append(f"[mmtune] run directory: {run_dir}")
    return lines


class RunSummary(L.Callback):
    """Prints `summary_lines` at the start of training, from rank 0, once per fit."""

    def __init__(self, run_dir: Optional[Path] = None) -> None:
        self.run_dir = run_dir
        self._printed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._printed or not trainer.is_global_zero:
            return
        self._printed = True
        print("\n".join(summary_lines(trainer, pl_module, self.run_dir)), flush=True)
