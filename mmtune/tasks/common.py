"""Free functions every task uses: callbacks, adapter-only checkpoints, optimizers, run paths.

Shared through functions rather than a base class, so each task file reads on its own.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Callable, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

from mmtune.adapters import trainable_state_dict
from mmtune.callbacks import ResumeLoaderPosition, RunSummary, StepSeed, ValidateAtStepLimit
from mmtune.checkpoint_io import CrashSafeCheckpoints
from mmtune.errors import ModelError
from mmtune.faults import NonFiniteGuard, PreemptionCheckpoint
from mmtune.metrics.records import RecordSet, SampleRecord, write_records
from mmtune.optim import build_optimizer, build_scheduler, param_groups
from mmtune.registry import Registry
from mmtune.specs import AdapterSpec, MonitorSpec, OptimizerSpec

log = logging.getLogger("mmtune")

TRAINABLE_ONLY = "trainable"

# The task classes a checkpoint may name (`checkpoint["mmtune_task"]`). A checkpoint is data: the class
# that rebuilds it is looked up here, never imported from a module path the file names. Each task module
# registers its class; `import mmtune` imports them all, so the registry is full before anything loads.
TASKS: Registry[type] = Registry("mmtune task")


def standard_callbacks(monitor: MonitorSpec, trainer: Optional[L.Trainer] = None) -> list[Callback]:
    """Best/last checkpoints (written crash-safely) and early stopping from the monitor spec, plus
    seeding, the loader's position on resume, validation at a `max_steps` limit, metrics.json, and the
    fault handling of `mmtune.faults` (a stop at a NaN/inf loss or gradient, `last.ckpt` on SIGTERM)
    with its defaults unless the trainer already has it (the CLI's `faults:` section).

    `last.ckpt` has its own callback: since Lightning 2.6 a `save_last=True` checkpoint is only
    rewritten when the top-k one is, so it would go stale whenever the metric stops improving.
    """
    callbacks: list[Callback] = [StepSeed(), ResumeLoaderPosition(), ValidateAtStepLimit(), RunSummary(),
                                 CrashSafeCheckpoints()]
    # Trainer(enable_checkpointing=False) leaves no ModelCheckpoint: honour it instead of adding ours.
    checkpointing = trainer is None or bool(trainer.checkpoint_callbacks)
    given = trainer.callbacks if trainer is not None else []
    if not any(isinstance(c, NonFiniteGuard) for c in given):
        callbacks.append(NonFiniteGuard())
    if monitor.save_last and checkpointing and not any(isinstance(c, PreemptionCheckpoint) for c in given):
        callbacks.append(PreemptionCheckpoint())
    if monitor.save_best and checkpointing:
        callbacks.append(ModelCheckpoint(monitor=monitor.metric, mode=monitor.mode, save_top_k=1, filename="best",
                                         auto_insert_metric_name=False, enable_version_counter=False))
    if monitor.save_last and checkpointing:
        callbacks.append(LastCheckpoint(monitor.save_last_every_n_steps, monitor=None, save_top_k=1, filename="last",
                                        enable_version_counter=False))
    if monitor.early_stopping:
        callbacks.append(EarlyStopping(monitor=monitor.metric, mode=monitor.mode, patience=monitor.patience))
    return callbacks


class LastCheckpoint(ModelCheckpoint):
    """Rewrites `last.ckpt` at every validation (a distinct class so Lightning keeps both callbacks) and,
    with `every_n_steps`, every that many optimizer steps inside an epoch.

    Lightning's `every_n_train_steps` cannot be combined with saving at validations (they are mutually
    exclusive, and the step saves would replace the validation ones), so the step saves are made here.
    A step save is left out where a validation comes right after the batch (the epoch's last batch, or
    a `val_check_interval` batch): the validation's own save follows with that validation's results,
    so a resume never skips a validation nor the early-stopping and best-checkpoint decisions it makes.
    It is only made at the end of an optimizer step, never inside gradient accumulation.
    """

    def __init__(self, every_n_steps: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.every_n_steps = every_n_steps

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.every_n_steps < 1 or step == 0 or step % self.every_n_steps or self._should_skip_saving_checkpoint(trainer):
            return
        done = batch_idx + 1
        at_step_end = done % trainer.accumulate_grad_batches == 0
        val_check = trainer.val_check_batch
        validation_next = done >= trainer.num_training_batches or (
            isinstance(val_check, int) and val_check > 0 and done % val_check == 0)
        if at_step_end and not validation_next:
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def saves_trainable_only(mode: str, adapter: AdapterSpec, base_reloadable: bool) -> bool:
    """Whether checkpoints keep only the weights training changes (`checkpoint_weights`): `auto` does
    when something is frozen and the frozen base can be reloaded from its source."""
    if mode != "auto":
        return mode == "trainable"
    something_frozen = adapter.method != "none" or "frozen" in adapter.parts.values()
    return something_frozen and base_reloadable


def on_save_checkpoint(module: L.LightningModule, checkpoint: dict, trainable_only: bool) -> None:
    """What every task does when Lightning saves: name the task class (so `mmtune export` needs only the
    file) and, for adapter runs on a reloadable base, keep only the weights training changes."""
    _record_task(module, checkpoint)
    if trainable_only:
        _keep_trainable_weights(module, checkpoint)


def on_load_checkpoint(module: nn.Module, checkpoint: dict) -> None:
    """What every task does when Lightning loads: refuse weights of another model by name, and fill a
    trainable-only checkpoint with the base weights so it loads strictly."""
    _check_checkpoint_fits(module, checkpoint)
    _complete_trainable_checkpoint(module, checkpoint)


class RunHooks:
    """The Lightning hooks every task shares, as a mixin placed before `L.LightningModule`: the
    monitor's callbacks and the checkpoint rules above. The task provides `monitor_spec` and
    `_trainable_only()`."""

    def configure_callbacks(self) -> list:
        return standard_callbacks(self.monitor_spec, self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        on_save_checkpoint(self, checkpoint, self._trainable_only())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        on_load_checkpoint(self, checkpoint)


def _record_task(module: L.LightningModule, checkpoint: dict) -> None:
    """Stores the task's registry name in the checkpoint, so `mmtune export` needs only the checkpoint.

    A class that is not registered (a subclass of one's own) is stored by its import path, which
    `load_task` refuses with a message saying how to register it.
    """
    cls = type(module)
    name = next((n for n in TASKS if TASKS.get(n) is cls), None)
    checkpoint["mmtune_task"] = name or f"{cls.__module__}:{cls.__qualname__}"


def read_checkpoint(path: str) -> dict:
    """Reads a checkpoint with `torch.load(weights_only=True)`: tensors and plain values only, so
    nothing in the file can run code while it loads.

    Raises:
        ModelError: the file is missing or unreadable, or holds anything else (e.g. a pickled object).
    """
    if not Path(path).is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        # mmap: tensors stay on disk until used, so reading the hyperparameters of a large file is cheap.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelError(f"refusing to load {path}: it holds objects other than tensors and plain values "
                         f"(weights_only load failed: {_refused_content(err)})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise ModelError(f"cannot read checkpoint {path}: {err}") from None


def _refused_content(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only error that says what was refused. The rest of the message
    suggests retrying with weights_only=False, which is exactly what an untrusted file must not get."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return lines[0].split(" Please use ")[0] if lines else "unsupported content"


def task_class(checkpoint: dict, path: str) -> type:
    """The registered task class a checkpoint names.

    New checkpoints hold a registry name; older ones an import path `mmtune.tasks.x:ClassName`, of
    which only the class name is looked up in the registry (no module is imported).

    Raises:
        ModelError: no name, or a name that is not one of the registered tasks.
    """
    import mmtune

    mmtune.import_public_api()  # every built-in task registers itself when its module is imported
    name = checkpoint.get("mmtune_task")
    if not name:
        raise ModelError(f"{path} was not written by an mmtune task (no 'mmtune_task' entry)")
    if name in TASKS:
        return TASKS.get(name)
    module_name, _, qualname = str(name).partition(":")
    if module_name == "mmtune" or module_name.startswith("mmtune."):
        for registered in TASKS:
            if TASKS.get(registered).__qualname__ == qualname:
                return TASKS.get(registered)
    raise ModelError(f"{path} names the task {name!r}, which is not one of mmtune's tasks "
                     f"({', '.join(sorted(TASKS))}); a task class of your own loads only once registered with "
                     "`@mmtune.tasks.common.TASKS.register(name)`")


def load_task(path: str, trust_remote_code: bool = False) -> L.LightningModule:
    """Rebuilds the task saved in a checkpoint (base weights from its model spec, plus saved weights).

    Args:
        path: an mmtune checkpoint.
        trust_remote_code: allow a checkpoint whose model spec sets `trust_remote_code: true`. The spec
            comes from the file, so the file alone must not be able to turn running model code on.

    Raises:
        ModelError: the file is unsafe or unreadable, names no registered task, or asks for remote code
            without `trust_remote_code`.
    """
    ckpt = read_checkpoint(path)
    cls = task_class(ckpt, path)
    hparams = ckpt.get("hyper_parameters") or {}
    wants_code = [key for key, value in hparams.items() if isinstance(value, dict) and value.get("trust_remote_code")]
    if wants_code and not trust_remote_code:
        raise ModelError(f"{path} loads its model with {wants_code[0]}.trust_remote_code: true, which runs code from "
                         "the model folder or hub; pass --trust_remote_code to mmtune export only if you trust both")
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def _keep_trainable_weights(module: nn.Module, checkpoint: dict) -> None:
    """Drops frozen base weights from a checkpoint: they reload from the base model, and adapter
    checkpoints stay small."""
    checkpoint["state_dict"] = trainable_state_dict(module, checkpoint["state_dict"])
    checkpoint["mmtune_weights"] = TRAINABLE_ONLY


def _check_checkpoint_fits(module: nn.Module, checkpoint: dict) -> None:
    """Raises a clear error when a checkpoint belongs to another architecture or head size.

    Every saved tensor must exist in the model with the same shape; a trainable-only checkpoint must
    also hold every trainable tensor, and a full one every tensor.
    """
    own = module.state_dict()
    saved = checkpoint.get("state_dict", {})
    unexpected = sorted(set(saved) - set(own))
    wrong = sorted(k for k in set(saved) & set(own) if saved[k].shape != own[k].shape)
    if checkpoint.get("mmtune_weights") == TRAINABLE_ONLY:
        needed = set(trainable_state_dict(module, own))
    else:
        needed = set(own)
    missing = sorted(needed - set(saved))
    if unexpected or wrong or missing:
        detail = []
        if wrong:
            detail.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: checkpoint {tuple(saved[wrong[0]].shape)}"
                          f" vs model {tuple(own[wrong[0]].shape)})")
        if unexpected:
            detail.append(f"{len(unexpected)} unknown to this model (e.g. {unexpected[:2]})")
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[:2]})")
        raise ModelError("the checkpoint does not fit this model (another architecture, head or adapter?): "
                         + "; ".join(detail))


def _complete_trainable_checkpoint(module: nn.Module, checkpoint: dict) -> None:
    """Fills a trainable-only checkpoint (already checked to fit) with the model's own frozen base
    weights, so it loads strictly like a full one."""
    if checkpoint.get("mmtune_weights") == TRAINABLE_ONLY:
        checkpoint["state_dict"] = {**module.state_dict(), **checkpoint["state_dict"]}


def adamw_with_schedule(
    trainer: L.Trainer, named_params: Iterable[tuple[str, nn.Parameter]], spec: OptimizerSpec, **group_kwargs
) -> dict:
    """AdamW + warmup/decay schedule over `trainer.estimated_stepping_batches` steps, for
    `configure_optimizers`. `group_kwargs` go to `mmtune.optim.param_groups`."""
    optimizer = build_optimizer(param_groups(named_params, spec, **group_kwargs), spec)
    return {"optimizer": optimizer, "lr_scheduler": build_scheduler(optimizer, spec, trainer.estimated_stepping_batches)}


def shard_fsdp2(module: nn.Module, device_mesh, blocks: Iterable[nn.Module]) -> None:
    """FSDP2 (`fully_shard`) for Lightning's ModelParallelStrategy: each block is its own unit (so
    only one block's weights are gathered at a time), then the root. Frozen and trainable weights
    may share a unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # No tensor parallelism here: shard over every process, whatever the strategy's mesh shape.
    mesh = init_device_mesh(device_mesh.device_type, (device_mesh.size(),))
    for block in blocks:
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def run_dir(trainer: Optional[L.Trainer]) -> Optional[Path]:
    """The run directory (where logs, checkpoints and outputs go), if there is one.

    Call it on every rank: under DDP `trainer.log_dir` is a broadcast from rank 0.
    """
    log_dir = trainer.log_dir if trainer is not None else None
    return Path(log_dir) if log_dir else None


def gather_objects(items: list) -> list:
    """All processes' lists concatenated (only needed under distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def gather_records(records: list[SampleRecord]) -> list[SampleRecord]:
    """Every process's records, each sample once: a distributed sampler pads the last batches with
    repeats of earlier samples, which have the same id. Call it on every rank (it gathers)."""
    unique: dict[str, SampleRecord] = {}
    for record in gather_objects(records):
        unique.setdefault(record.id, record)
    return list(unique.values())


def publish_records(module: L.LightningModule, stage: str, kind: str, records: list[SampleRecord],
                    info: Optional[dict] = None) -> RecordSet:
    """Hands out a stage's per-sample records: gathered from every process (the padding a distributed
    sampler adds is dropped by id), kept on the module as `records[stage]` and written by rank 0 to
    `<run>/records/<stage>.jsonl`, where evaluation, reports and exports read them.

    Call it on every rank (it gathers).
    """
    unique = {r.id: r for r in gather_records(records)}
    info = dict(info or {})
    trainer = module._trainer
    if trainer is not None and trainer.ckpt_path:
        info.setdefault("ckpt_path", str(trainer.ckpt_path))
    result = RecordSet(kind, list(unique.values()), {"stage": stage, **info})
    if not hasattr(module, "records"):
        module.records = {}
    module.records[stage] = result
    out = run_dir(trainer)
    if out is not None and trainer.is_global_zero:
        write_records(out / "records" / f"{stage}.jsonl", result)
    return result


def read_checkpoint_hparams(path: str) -> dict:
    """The hyperparameters saved in a Lightning checkpoint, without building anything (read with
    `read_checkpoint`: plain values only)."""
    return dict(read_checkpoint(path).get("hyper_parameters") or {})
