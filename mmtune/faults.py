"""Numerical faults and preemption: what a fit does when its loss or gradients stop being finite, and
when the machine it runs on is taken away (SIGTERM).

Both are callbacks every task gets (`mmtune.tasks.common.standard_callbacks` adds them with their
defaults; the CLI's `faults:` section configures them), so no task grows a branch for either. They
name a batch by the `sample_id` list each data module's collate puts into its batches.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmtune.errors import ConfigError, TrainingError

log = logging.getLogger("mmtune")

EXIT_ON_SIGTERM = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM: "not finished"
MAX_IDS_SHOWN = 16


@dataclass
class FaultSpec:
    """The `faults:` section of a config.

    Args:
        on_nonfinite: a NaN or infinite training loss or gradient: `error` stops the fit before the
            optimizer step, with an error naming the global step and the batch's sample ids (the
            weights stay finite; checkpoints already written are kept, none of broken weights is
            written); `skip` leaves the batch out (no optimizer update, optimizer state untouched),
            counts it (`train/nonfinite_skipped` in the logs, `nonfinite_skipped` in metrics.json's fit
            entry, with the steps and ids) and stops with the error once more than `max_nonfinite`
            batches were skipped.
        max_nonfinite: under `skip`, the most batches that may be skipped; one more stops the fit.
        checkpoint_on_sigterm: on SIGTERM (what clusters send before they take the machine back),
            save `last.ckpt` at the end of the current training step, exactly resumable with
            `--ckpt_path last`, and stop with exit status 143.
    """

    on_nonfinite: Literal["error", "skip"] = "error"
    max_nonfinite: int = 10
    checkpoint_on_sigterm: bool = True

    def __post_init__(self) -> None:
        if self.on_nonfinite not in ("error", "skip"):
            raise ConfigError(f"faults.on_nonfinite must be 'error' or 'skip', got {self.on_nonfinite!r}")
        if self.max_nonfinite < 0:
            raise ConfigError(f"faults.max_nonfinite must be 0 or more, got {self.max_nonfinite}")


def fault_callbacks(spec: FaultSpec) -> list[Callback]:
    """The callbacks a `faults:` section asks for (the CLI attaches them to fit)."""
    callbacks: list[Callback] = [NonFiniteGuard(spec.on_nonfinite, spec.max_nonfinite)]
    if spec.checkpoint_on_sigterm:
        callbacks.append(PreemptionCheckpoint())
    return callbacks


def batch_sample_ids(batch: Any) -> list[str]:
    """The `sample_id` list of a batch (empty for a batch without one)."""
    ids = batch.get("sample_id") if isinstance(batch, dict) else None
    return [str(i) for i in ids] if isinstance(ids, (list, tuple)) else []


def _shown(ids: list[str]) -> str:
    if not ids:
        return "(the batch has no sample ids)"
    more = f" ... ({len(ids) - MAX_IDS_SHOWN} more)" if len(ids) > MAX_IDS_SHOWN else ""
    return ", ".join(ids[:MAX_IDS_SHOWN]) + more


def _gather(value: Any) -> list:
    """Every process's `value` (a collective under torch.distributed, else `[value]`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _last_checkpoint_path(trainer: L.Trainer) -> Optional[str]:
    """Where `last.ckpt` goes (the checkpoint callback named `last`, else the first one's folder)."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    named = [c for c in callbacks if c.filename == "last"] or callbacks
    if not named or not named[0].dirpath:
        return None
    return str(Path(named[0].dirpath) / "last.ckpt")


class NonFiniteGuard(Callback):
    """Stops the fit, or skips the batch, when the training loss or a gradient is NaN or infinite.

    The loss is checked before backward and the gradients before the optimizer step
    (`on_before_optimizer_step`, after DDP has averaged them), as one flag on the device: one host
    sync per step. A skipped step drops the gradients (`zero_grad(set_to_none=True)`): torch
    optimizers pass over parameters without a gradient, so neither weights nor moments nor step
    counts change (the learning-rate schedule and `global_step` still advance, as with AMP's skipped
    steps). Under DDP/FSDP each process sees only its own loss and shards, so the flag is all-reduced
    and every process takes the same decision (else one would step and the others not, and their
    weights would part). Under fp16 with a gradient scaler, infinite gradients are the scaler's own
    signal to lower its scale, so only the loss is checked there.

    Args:
        on_nonfinite: `error` or `skip` (see `FaultSpec`).
        max_nonfinite: under `skip`, the most batches skipped; one more raises the error.
    """

    def __init__(self, on_nonfinite: Literal["error", "skip"] = "error", max_nonfinite: int = 10) -> None:
        FaultSpec(on_nonfinite, max_nonfinite)  # checks the values
        self.on_nonfinite, self.max_nonfinite = on_nonfinite, max_nonfinite
        self.skipped_batches: list[dict] = []  # {"global_step", "epoch", "batch", "reason", "sample_ids"}
        self._ids: list[str] = []  # sample ids of the micro-batches of the coming optimizer step
        self._batch: Optional[int] = None
        self._loss_bad: Optional[torch.Tensor] = None
        self._names: dict[int, str] = {}

    @property
    def skipped(self) -> int:
        return len(self.skipped_batches)

    def state_dict(self) -> dict:
        return {"skipped_batches": self.skipped_batches}  # so the limit counts across resumes

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_batches = list(state_dict.get("skipped_batches", []))

    def fit_summary(self) -> dict:
        """What `RunSummary` writes into metrics.json's fit entry."""
        return {"nonfinite_skipped": self.skipped, "nonfinite_batches": self.skipped_batches}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._names = {id(p): name for name, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._batch is None:
            self._batch = batch_idx
        self._ids += batch_sample_ids(batch)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        try:
            self._check(trainer, pl_module, optimizer)
        finally:
            self._ids, self._batch, self._loss_bad = [], None, None

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grad_bad = [] if scaled else [torch.isfinite(_local(g)).all().logical_not() for g in grads]
        flags = ([self._loss_bad] if self._loss_bad is not None else []) + grad_bad
        local_bad = bool(torch.stack(flags).any()) if flags else False
        if not trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            if self.on_nonfinite == "skip":
                pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
            return
        reason, ids = self._describe(optimizer, grad_bad)
        where = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "batch": self._batch}
        text = (f"non-finite {reason} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {self._batch}); samples in the batch: {_shown(ids)}")
        if self.on_nonfinite == "error" or self.skipped >= self.max_nonfinite:
            raise TrainingError(self._error(trainer, text))
        optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter and its state alone
        self.skipped_batches.append({**where, "reason": reason, "sample_ids": ids})
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if trainer.is_global_zero:
            log.warning("[mmtune] skipped a batch (%d of at most %d): %s", self.skipped, self.max_nonfinite, text)

    def _describe(self, optimizer, grad_bad: list[torch.Tensor]) -> tuple[str, list[str]]:
        """What was not finite, and the ids to name: the batches of the processes whose loss was
        (every process's batch when only the averaged gradients were)."""
        loss_bad = bool(self._loss_bad) if self._loss_bad is not None else False
        names = []
        if grad_bad and not loss_bad:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            names = [self._names.get(id(p), "?") for p, bad in zip(params, grad_bad) if bool(bad)]
        parts = _gather((loss_bad, names, self._ids))
        if any(bad for bad, _, _ in parts):
            ids = [i for bad, _, part in parts for i in part if bad]
            return "loss", ids
        names = next((n for _, n, _ in parts if n), [])
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        return f"gradient ({names[0] if names else '?'}{more})", [i for _, _, part in parts for i in part]

    def _error(self, trainer: L.Trainer, text: str) -> str:
        last = _last_checkpoint_path(trainer)
        kept = (f"checkpoints written before it are kept ({last})" if last and Path(last).is_file()
                else "no checkpoint had been written yet")
        if self.on_nonfinite == "skip":
            return (f"{text}; {self.skipped} batches were skipped before (faults.max_nonfinite: {self.max_nonfinite}); "
                    f"the fit stopped before this optimizer step, {kept}")
        return (f"{text}; the fit stopped before this optimizer step, {kept} "
                "(faults.on_nonfinite: skip skips such batches)")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), else the tensor: the check stays on this process's part."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class PreemptionCheckpoint(Callback):
    """On SIGTERM, saves `last.ckpt` at the end of the current training step and stops the fit.

    Lightning only sets a flag on SIGTERM (outside SLURM's requeue, which it handles on SIGUSR1); its
    loops check the flag between batches and then leave with `SIGTERMException`, a SystemExit of
    status 0, writing no checkpoint: a preempted job looked finished and lost everything since the
    last validation. Here the flag is read after every training batch (all-reduced, so every process
    saves and stops at the same step), at the end of an optimizer step (not inside gradient
    accumulation), and the checkpoint is written there: with the data modules' `ResumableLoader` a
    resume continues with the very next batch. The fit then exits with status 143, so schedulers and
    `mmtune fit && ...` scripts see that it did not finish. A SIGTERM that lands inside validation
    stops there (Lightning's check), keeping the last checkpoint written before it.
    """

    def __init__(self) -> None:
        self.saved: Optional[str] = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: Any,
                           batch_idx: int) -> None:
        flag = trainer.received_sigterm
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        if not flag or not self._at_step_end(trainer, batch_idx):
            return
        path = _last_checkpoint_path(trainer) or str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            print(f"[mmtune] SIGTERM: saved {path} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
                  f"batch {batch_idx + 1} of {trainer.num_training_batches}); stopping. Resume with --ckpt_path last",
                  flush=True)
        raise SIGTERMException(EXIT_ON_SIGTERM)

    @staticmethod
    def _at_step_end(trainer: L.Trainer, batch_idx: int) -> bool:
        every = trainer.accumulate_grad_batches
        return (batch_idx + 1) % every == 0 or batch_idx + 1 >= trainer.num_training_batches

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = EXIT_ON_SIGTERM  # Lightning's own stop has status 0; this fit did not finish
        if self.saved is None and trainer.is_global_zero:
            last = _last_checkpoint_path(trainer)
            kept = last if last and Path(last).is_file() else "none written yet"
            print(f"[mmtune] SIGTERM during {'validation' if trainer.validating or trainer.sanity_checking else 'the fit'}:"
                  f" stopped without a new checkpoint; the last one is kept ({kept})", flush=True)


def slurm_requeued() -> bool:
    """Whether this process is a SLURM job started again after a requeue (SLURM counts restarts)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
