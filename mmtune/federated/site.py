"""One site: the task and data module of the task YAML, built once, fitted locally each round.

A site runs ordinary Lightning fits of the unchanged task on its own data; what federation adds are
callbacks: `LoadGlobalTensors` (the global model's trainable tensors copied in once the task has
built its model), `FrozenNormStatistics` (frozen BatchNorm layers keep their pretrained statistics)
and `ProximalGradient` (FedProx's proximal term). Nothing but the trainable tensors
(`mmtune.federated.arrays.trainable_tensors`) and counts/metrics leave a site.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from mmtune.errors import ConfigError
from mmtune.federated.arrays import load_tensors, trainable_tensors

log = logging.getLogger("mmtune")

# Trainer settings of the task YAML a site round never takes: federation decides the length of a round
# and where files go; checkpoints are the server's job.
ROUND_OWNED = ("max_epochs", "max_steps", "min_epochs", "min_steps", "logger", "callbacks", "enable_checkpointing",
               "default_root_dir", "plugins", "num_sanity_val_steps", "max_time")


def build_task_and_data(config: dict, data_overrides: Optional[dict] = None) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The task and data module of a task config (`model:`/`data:` sections, as `mmtune fit` reads
    them, through LightningCLI so class paths, specs and type checks are the same)."""
    import mmtune
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    mmtune.import_public_api()
    cfg = {k: copy.deepcopy(config[k]) for k in ("model", "data", "seed_everything") if k in config}
    if "model" not in cfg or "data" not in cfg:
        raise ConfigError("a federated task config needs model: and data: sections (as for mmtune fit)")
    if data_overrides:
        init = cfg["data"].setdefault("init_args", {})
        init.update(data_overrides)
    cfg["trainer"] = {"logger": False, "enable_checkpointing": False, "accelerator": "cpu"}
    argv, sys.argv = sys.argv, sys.argv[:1]  # a Flower app process's own arguments are not the task's
    try:
        cli = LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           seed_everything_default=42, auto_configure_optimizers=False, run=False, args=cfg,
                           save_config_callback=None)
    except SystemExit as err:  # jsonargparse printed what is wrong with the config
        raise ConfigError(f"the task config does not parse (see the message above; exit {err.code})") from None
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


def round_trainer_kwargs(config: dict) -> dict:
    """The task YAML's trainer settings a round keeps (accelerator, precision, batches per epoch, ...)."""
    trainer = dict(config.get("trainer") or {})
    return {k: v for k, v in trainer.items() if k not in ROUND_OWNED}


class LoadGlobalTensors(Callback):
    """Copies the global model's trainable tensors into the task once its model is built (fit,
    validate or test start: after `configure_model`), checking keys and shapes."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.tensors, self.source, self.done = tensors, source, False

    def _load(self, pl_module: L.LightningModule) -> None:
        if not self.done:
            load_tensors(pl_module, self.tensors, self.source)
            self.done = True

    def on_fit_start(self, trainer, pl_module) -> None:
        self._load(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._load(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._load(pl_module)


class FrozenNormStatistics(Callback):
    """Keeps BatchNorm layers whose own parameters are frozen (a backbone under an adapter) in eval
    mode during a site's fit, so they normalize with their pretrained statistics.

    Why: in train mode such a layer normalizes each batch by its own mean, and a non-IID site's batch
    often holds one class, so the class's mean feature, the very signal the head needs, is subtracted
    away; its running statistics also drift to the site's data and differ at evaluation. (Set on
    every batch: Lightning puts the whole module back in train mode between stages.)"""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in pl_module.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training and \
                    not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()


class ProximalGradient(Callback):
    """FedProx's proximal term mu/2 * ||w - w_global||^2, added as its gradient mu * (w - w_global)
    after each backward pass, so the task's loss stays untouched."""

    def __init__(self, mu: float, tensors: dict[str, torch.Tensor]) -> None:
        self.mu, self.tensors = mu, tensors

    def on_after_backward(self, trainer, pl_module) -> None:
        for name, param in pl_module.named_parameters():
            ref = self.tensors.get(name)
            if param.requires_grad and param.grad is not None and ref is not None:
                param.grad.add_(param.detach() - ref.to(param.device, param.dtype), alpha=self.mu)


@dataclass
class RoundResult:
    tensors: dict[str, torch.Tensor]
    samples: int
    metrics: dict[str, float]
    seconds: float


class Site:
    """A site's task, data and round settings.

    Args:
        name: the site's name (in logs and reports).
        config: the task config (plain dict of the YAML).
        out_dir: where the site's rounds write (run directory of the site).
        data_overrides: data module arguments replacing the YAML's (e.g. the site's `path`).
    """

    def __init__(self, name: str, config: dict, out_dir: Path, data_overrides: Optional[dict] = None) -> None:
        self.name = name
        self.out_dir = Path(out_dir)
        self.task, self.data = build_task_and_data(config, data_overrides)
        self.trainer_kwargs = round_trainer_kwargs(config)
        self._data_classes: Optional[list[str]] = None

    def describe(self, classes: Optional[list[str]]) -> dict[str, Any]:
        """What the server asks before the first round: the site's own class list and train size.
        With `classes` (the federation's list) the task is fixed to it, so every site's head has the
        same size and order whatever classes its own data happen to hold."""
        if self._data_classes is None:  # the data's own list, before the task connects its final one
            self.data.prepare_data()
            self.data.setup("fit")
            self._data_classes = list(getattr(self.data, "classes", []) or [])
        own = self._data_classes
        if classes and hasattr(self.task.hparams, "classes") and not self.task.hparams.get("classes"):
            self.task.hparams.classes = list(classes)
        splits = getattr(self.data, "splits", {}) or {}
        return {"classes": own, "train_samples": len(splits.get("train", []))}

    def _trainer(self, callbacks: list[Callback], **overrides) -> L.Trainer:
        kwargs = {"accelerator": "cpu", **self.trainer_kwargs, "logger": False, "enable_checkpointing": False,
                  "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                  "default_root_dir": str(self.out_dir), "callbacks": callbacks, **overrides}
        return L.Trainer(**kwargs)

    def fit_round(self, tensors: dict[str, torch.Tensor], local_epochs: int, local_steps: int = 0,
                  proximal_mu: float = 0.0, extra_callbacks: Optional[list[Callback]] = None) -> RoundResult:
        """Trains from the global tensors for `local_epochs` (or `local_steps`) and returns the new
        trainable tensors, the number of training samples and the fit's last logged metrics."""
        start = time.perf_counter()
        callbacks: list[Callback] = [LoadGlobalTensors(tensors, f"site {self.name}"), FrozenNormStatistics()]
        if proximal_mu > 0:
            callbacks.append(ProximalGradient(proximal_mu, tensors))
        callbacks += list(extra_callbacks or [])
        limits = {"max_steps": local_steps, "max_epochs": None} if local_steps > 0 else {"max_epochs": local_epochs}
        trainer = self._trainer(callbacks, **limits)
        trainer.fit(self.task, datamodule=self.data)
        samples = len(trainer.train_dataloader.dataset)
        metrics = _floats(trainer.callback_metrics)
        return RoundResult(trainable_tensors(self.task), samples, metrics, time.perf_counter() - start)

    def evaluate(self, tensors: dict[str, torch.Tensor]) -> tuple[int, dict[str, float]]:
        """Scores the global tensors on the site's validation split: (samples, metrics)."""
        trainer = self._trainer([LoadGlobalTensors(tensors, f"site {self.name}")])
        trainer.validate(self.task, datamodule=self.data, verbose=False)
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return len(loader.dataset), _floats(trainer.callback_metrics)


def _floats(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out
