"""Stages trained one after another: each from the previous stage's model (head grown for new
classes), with replay and LwF, scored on every earlier stage's test set after it.

A stage is an ordinary Lightning fit of the unchanged task (`mmtune.federated.site.Site`); what is
added are the head growth (`grow_tensors`) and the `LwFDistillation` callback.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from mmtune.continual.spec import ContinualSpec
from mmtune.continual.stages import check_leakage, draw_replay, grown_classes, stage_rows, write_manifest
from mmtune.federated.arrays import trainable_tensors
from mmtune.federated.site import Site, build_task_and_data
from mmtune.files import atomic_write, update_json

log = logging.getLogger("mmtune")


def grow_tensors(previous: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], old: int, new: int) -> dict:
    """The new stage's starting tensors: the previous stage's, with every per-class tensor (first
    dimension `old`, now `new`: head weight and bias, per-class thresholds) keeping its old rows and
    taking the fresh initialisation for the appended classes."""
    out = {}
    for key, value in fresh.items():
        before = previous.get(key)
        if before is None:
            out[key] = value
        elif before.shape == value.shape:
            out[key] = before.clone()
        elif before.ndim == value.ndim and before.ndim > 0 and before.shape[0] == old and value.shape[0] == new \
                and before.shape[1:] == value.shape[1:]:
            grown = value.clone()
            grown[:old] = before
            out[key] = grown
        else:
            out[key] = value
    return out


class LwFDistillation(Callback):
    """Learning without Forgetting (Li & Hoiem): adds weight * T^2 * KL(teacher || student) on the
    old classes' softened logits of each training batch, as an extra backward before the optimizer
    step (the task's own loss is untouched)."""

    def __init__(self, teacher: torch.nn.Module, old_classes: int, weight: float, temperature: float) -> None:
        self.teacher, self.old, self.weight, self.t = teacher.eval(), old_classes, weight, temperature
        self._pixels: Optional[torch.Tensor] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._pixels = batch["pixels"]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._pixels is None:
            return
        with torch.no_grad():
            target = self.teacher(self._pixels.to(next(self.teacher.parameters()).device))[:, :self.old]
        student = pl_module(self._pixels)[:, :self.old]
        loss = F.kl_div(F.log_softmax(student / self.t, -1), F.softmax(target.to(student) / self.t, -1),
                        reduction="batchmean") * self.weight * self.t ** 2
        loss.backward()
        if trainer is not None:
            pl_module.log("train/lwf", loss.detach(), batch_size=len(student))


def _stage_config(config: dict, path: Path, classes: list[str], epochs: int) -> dict:
    cfg = copy.deepcopy(config)
    cfg["data"].setdefault("init_args", {})["path"] = str(path)
    cfg["model"].setdefault("init_args", {})["classes"] = list(classes)
    if epochs:
        cfg.setdefault("trainer", {})["max_epochs"] = epochs
    return cfg


def _test_accuracy(site: Site, config: dict, test_manifest: Path) -> float:
    # the data module needs a train split to read: the stage's own training manifest beside its test rows
    _, data = build_task_and_data(config, {"path": str(test_manifest.parent / "train.csv"), "test_path": str(test_manifest)})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(site.out_dir / "scores"))
    result = trainer.test(site.task, datamodule=data, verbose=False)
    return float(result[0]["test/accuracy"])


def forgetting_summary(matrix: list[list[Optional[float]]]) -> dict:
    """Average forgetting and backward transfer of an accuracy matrix (row i: after stage i; column j:
    stage j's test set), over the stages before the last (Chaudhry et al.; Lopez-Paz & Ranzato)."""
    last = len(matrix) - 1
    if last < 1:
        return {"average_forgetting": None, "backward_transfer": None}
    forgetting = [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]
    transfer = [matrix[last][j] - matrix[j][j] for j in range(last)]
    return {"average_forgetting": sum(forgetting) / last, "backward_transfer": sum(transfer) / last,
            "forgetting_per_stage": forgetting}


def run_continual(config: dict, spec: ContinualSpec, run_dir: Path) -> dict:
    """Trains the stages and writes `continual.json`, the `continual` entry of `metrics.json`, each
    stage's manifests (`stage_k/train.csv`, `replay.csv`, `test.csv`) and `checkpoints/stage_k.ckpt`."""
    init = (config.get("data") or {}).get("init_args") or {}
    ratios = tuple(init.get("split") or (0.7, 0.15, 0.15))
    label = init.get("label_column", "label")
    classes: list[str] = list(((config.get("model") or {}).get("init_args") or {}).get("classes") or [])
    earlier_tests: dict[str, set[str]] = {}
    train_pool: list[dict] = []
    tests: list[tuple[str, Path]] = []
    matrix: list[list[Optional[float]]] = []
    stages_out = []
    previous: Optional[Site] = None
    prev_tensors: dict = {}
    for k, stage in enumerate(spec.stages):
        name = stage.name or f"stage_{k}"
        out = run_dir / name
        header, rows = stage_rows(Path(stage.path), ratios, int(init.get("seed", 42)), init.get("group_column"), label,
                                  init.get("label_separator", "|"), bool(init.get("stratify", True)))
        check_leakage(name, rows, earlier_tests)
        replay = draw_replay(train_pool, spec.replay.count, spec.replay.share, spec.replay.seed + k) if k else []
        train_rows = [r for r in rows if r["split"] in ("train", "val")] + replay
        write_manifest(out / "train.csv", header, train_rows)
        write_manifest(out / "replay.csv", header, replay)
        test_manifest = write_manifest(out / "test.csv", header, [r for r in rows if r["split"] == "test"])
        old = len(classes)
        classes = grown_classes(classes, rows, label)
        cfg = _stage_config(config, out / "train.csv", classes, spec.epochs)
        site = Site(name, cfg, out)
        site.task.configure_model()
        start = grow_tensors(prev_tensors, trainable_tensors(site.task), old, len(classes)) if k else trainable_tensors(site.task)
        extra = []
        if previous is not None and spec.distill.weight > 0:
            extra.append(LwFDistillation(previous.task, old, spec.distill.weight, spec.distill.temperature))
        result = site.fit_round(start, spec.epochs or int((config.get("trainer") or {}).get("max_epochs") or 1),
                                extra_callbacks=extra)
        prev_tensors = result.tensors
        tests.append((name, test_manifest))
        row = [_test_accuracy(site, cfg, path) for _, path in tests]
        matrix.append(row + [None] * (len(spec.stages) - len(row)))
        ckpt = run_dir / "checkpoints" / f"{name}.ckpt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        site.task.trainer.save_checkpoint(str(ckpt), weights_only=True)
        stages_out.append({"name": name, "classes": list(classes), "train_rows": len(train_rows),
                           "replayed": len(replay), "checkpoint": str(ckpt), "seconds": result.seconds})
        log.info("[mmtune] continual %s: accuracy on stages so far %s", name, row)
        earlier_tests[name] = {r["path"] for r in rows if r["split"] == "test"}
        train_pool += [r for r in rows if r["split"] == "train"]
        previous = site
    summary = {"stages": stages_out, "accuracy_matrix": matrix,
               **forgetting_summary([[v for v in r if v is not None] for r in matrix])}
    with atomic_write(run_dir / "continual.json", "w") as f:
        json.dump(summary, f, indent=2)
    update_json(run_dir / "metrics.json", "continual", {
        "stages": [s["name"] for s in stages_out],
        **{k: summary.get(k) for k in ("accuracy_matrix", "average_forgetting", "backward_transfer", "forgetting_per_stage")}})
    return summary
