"""The baseline of `mmtune evaluate --baseline B`: another checkpoint, an export, or the untuned base.

The baseline is an ordinary task scored by the same trainer on the same data module as the tuned model,
so the two record sets cover the same samples and pair up by sample id.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from mmtune.errors import ConfigError, ModelError

BASE = "base"

log = logging.getLogger("mmtune")


def build_baseline(tuned: L.LightningModule, baseline: str) -> L.LightningModule:
    """A task to score as the baseline of `tuned`.

    Args:
        tuned: the task being evaluated (its class and settings define what "base" means).
        baseline: `base` (the tuned task's own untuned model: adapters off / starting weights), a
            `.ckpt` file (any mmtune checkpoint of the same task, e.g. a linear probe or an earlier
            model), or an `mmtune export` folder.

    Raises:
        ConfigError: `base` for a task that has no meaningful untuned model (a classifier's head is
            trained from scratch, a base of random weights), an export for a task scored against a
            reference model (DPO), or a path that is neither a checkpoint nor an export.
        ModelError: a checkpoint or export of another task.
    """
    if baseline == BASE:
        return _untuned(tuned)
    path = Path(baseline)
    if path.is_file():
        from mmtune.tasks.common import load_task

        task = load_task(str(path))
        if type(task) is not type(tuned):
            raise ModelError(f"--baseline {baseline} is a {type(task).__name__} checkpoint; the tuned model is a "
                             f"{type(tuned).__name__}: they cannot be compared")
        return task
    if path.is_dir():
        return _from_export(tuned, path)
    raise ConfigError(f"--baseline {baseline!r}: not 'base', a checkpoint file or an export folder")


def _untuned(tuned: L.LightningModule) -> L.LightningModule:
    """The tuned task's settings, built afresh and scored without any checkpoint: the base model as
    configured (pretrained weights, quantized as configured) with new adapters, which change nothing
    at their initialisation (LoRA/DoRA/LoHa/LoKr start with a zero update, IA3 with unit scales;
    a test checks the logits against the plain base model). Refused where that is not an untuned model
    worth scoring: a head trained from scratch, or a base of random weights."""
    hp = dict(tuned.hparams)
    if not getattr(tuned, "untuned_baseline", True):
        raise ConfigError(f"--baseline base: a {type(tuned).__name__} has no untuned model to score (its head "
                          "is trained from scratch); pass a checkpoint or an export, e.g. a linear probe's")
    model = hp.get("model") or {}
    if model.get("pretrained") is False:
        raise ConfigError(f"--baseline base: model.pretrained is false, so the untuned {model.get('name')} has "
                          "random weights; pass a checkpoint or an export as the baseline")
    if model.get("quantization", "none") != "none":
        log.info("[mmtune] --baseline base: the untuned model is scored %s-quantized, as the adapters were trained "
                 "on it; for the full-precision model pass its folder as --baseline", model["quantization"])
    return type(tuned)(**hp)


def _from_export(tuned: L.LightningModule, folder: Path) -> L.LightningModule:
    """The tuned task's settings with the exported model as its (fully loaded) base model. A folder
    without `mmtune.json` (e.g. the original model's `save_pretrained` folder) is taken as is."""
    from mmtune.tasks.common import TASKS

    if not getattr(tuned, "baseline_from_export", True):
        raise ConfigError(f"--baseline {folder}: a {type(tuned).__name__} scores against its reference model, and "
                          "an exported model would be its own reference; pass a checkpoint of the task or 'base'")
    meta_file = folder / "mmtune.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    task_name = next((name for name in TASKS if TASKS.get(name) is type(tuned)), None)
    if meta.get("task") and task_name and meta["task"] != task_name:
        raise ModelError(f"--baseline {folder} is an export of a {meta['task']} model; the tuned model is a "
                         f"{task_name}: they cannot be compared")
    hp = dict(tuned.hparams)
    hp["model"] = {**hp["model"], "name": str(folder), "checkpoint": None, "pretrained": True, "quantization": "none"}
    hp["adapter"] = {"method": "none"}
    if "classes" in hp:
        if not meta.get("classes"):
            raise ModelError(f"--baseline {folder}: no class list in {meta_file} (not an mmtune classifier export)")
        hp["classes"] = meta["classes"]
    return type(tuned)(**hp)
