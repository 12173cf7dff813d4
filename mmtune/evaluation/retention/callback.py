"""The forgetting check of a fit, as a Lightning callback the CLI attaches when the config has a
`retention:` section.

Timeline: `setup` checks every set's path and that its kind fits the task (before the model is
built); `on_fit_start` reads and prepares the sets (bad rows stop the run here, before training);
`on_train_start` scores the untuned model: after checkpoint restore and before the first step, so
adapters are still a no-op and a full fine-tune still has its starting weights; optionally every
validation scores again (`retention/<set>/<metric>`); `on_train_end` scores the tuned model, writes the
table to metrics.json (`retention`) and prints it; a failed check with `action: fail` is raised in
`teardown`, after every other callback has written the checkpoints and metrics.json.

Every process scores the whole set (correct for DDP and for sharded models, whose forward passes need
every process); rank 0's table is broadcast and written. The untuned scores (and the untuned features of
`feature_agreement`) are saved in checkpoints, so a resumed fit compares with the real starting point.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from mmtune.evaluation.retention.scorers import RetentionError, Runner, Scorer, build_scorer, check_source, scorer_class
from mmtune.evaluation.retention.spec import RetentionSet, RetentionSpec
from mmtune.evaluation.retention.table import FAIL, WARN, checked_metrics, describe, format_table, retention_rows
from mmtune.files import update_json

log = logging.getLogger("mmtune")


class RetentionCallback(Callback):
    """Scores the retention sets of `spec` before and after fine-tuning (see the module docstring).

    Args:
        spec: the config's `retention:` section.

    Attributes:
        rows: the table after fit (metrics.json's `retention.sets`).
    """

    def __init__(self, spec: RetentionSpec) -> None:
        self.spec = spec
        self.scorers: dict[str, Scorer] = {}
        self.before: dict[str, dict[str, float]] = {}
        self.before_step: Optional[int] = None
        self.rows: list[dict] = []
        self._restored: dict[str, dict] = {}
        self._latest: Optional[tuple[int, dict]] = None  # (global step, scores) of the last validation's scoring

    # ---- checks and preparation -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for rset in self.spec.sets:
            scorer_class(rset, pl_module)
            check_source(rset)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        runner = Runner.for_trainer(trainer, pl_module)
        self.scorers = {rset.name: build_scorer(rset, pl_module, runner) for rset in self.spec.sets}

    # ---- scoring -----------------------------------------------------------------------------------
    def _score_all(self, pl_module: L.LightningModule) -> dict[str, dict[str, float]]:
        return {name: scorer.score(pl_module) for name, scorer in self.scorers.items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, state in self._restored.items():
            if name in self.scorers:
                self.scorers[name].load_state(state)
        missing = [rset for rset in self.spec.sets if rset.name not in self.before]
        if missing and self.before:
            log.warning("[mmtune] retention: set(s) %s are new since the checkpoint; their 'before' is the resumed "
                        "model at step %d, not the untuned one", [r.name for r in missing], trainer.global_step)
        elif missing and trainer.ckpt_path:
            log.warning("[mmtune] retention: the checkpoint %s holds no untuned scores; 'before' is the resumed "
                        "model at step %d", trainer.ckpt_path, trainer.global_step)
        for rset in missing:
            self.before[rset.name] = self.scorers[rset.name].score(pl_module)
            checked_metrics(rset, list(self.before[rset.name]), self.scorers[rset.name].default_metrics)
        if missing:
            self.before_step = trainer.global_step if self.before_step is None else self.before_step
            if trainer.is_global_zero:
                summary = ", ".join(f"{name}: " + ", ".join(f"{m} {v:.4g}" for m, v in self.before[name].items())
                                    for name in (r.name for r in missing))
                print(f"[mmtune] retention before fine-tuning (step {trainer.global_step}): {summary}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.spec.every_validation or trainer.sanity_checking or not self.scorers:
            return
        scores = self._score_all(pl_module)
        self._latest = (trainer.global_step, scores)
        pl_module.log_dict({f"retention/{name}/{metric}": value for name, values in scores.items()
                            for metric, value in values.items()}, sync_dist=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.scorers:
            return
        if self._latest is not None and self._latest[0] == trainer.global_step:
            after = self._latest[1]  # the last validation scored these very weights
        else:
            after = self._score_all(pl_module)
        rows = []
        for rset in self.spec.sets:
            scorer = self.scorers[rset.name]
            before = self.before[rset.name]
            checked = checked_metrics(rset, list(before), scorer.default_metrics)
            higher = {m: scorer.higher_is_better(m) for m in before}
            rows += retention_rows(rset, before, after[rset.name], higher, checked)
        self.rows = trainer.strategy.broadcast(rows, src=0)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero:
            if log_dir:
                update_json(Path(log_dir) / "metrics.json", "retention",
                            {"sets": self.rows, "before_step": self.before_step, "after_step": trainer.global_step,
                             "weights": "last"})
            print(f"[mmtune] retention: untuned model (step {self.before_step}) against the tuned model "
                  f"(step {trainer.global_step}):")
            print(format_table(self.rows))
            for row in self.rows:
                if row["status"] == WARN:
                    log.warning("[mmtune] retention warning: %s", describe(row))
        self._log_dir = log_dir

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        failed = [row for row in self.rows if row["status"] == FAIL]
        if stage != "fit" or not failed:
            return
        self.rows = []  # raised once, even if teardown runs again
        where = f"; checkpoints and metrics.json are kept in {self._log_dir}" if getattr(self, "_log_dir", None) else ""
        raise RetentionError("retention check failed: " + "; ".join(describe(r) for r in failed) + where)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "before_step": self.before_step,
                "scorers": {name: scorer.state() for name, scorer in self.scorers.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = dict(state_dict.get("before") or {})
        self.before_step = state_dict.get("before_step")
        self._restored = dict(state_dict.get("scorers") or {})


def retention_callbacks(spec: Optional[RetentionSpec]) -> list[Callback]:
    """The callbacks `mmtune fit` attaches for a config's `retention:` section (none without sets)."""
    return [RetentionCallback(spec)] if spec is not None and spec.sets else []


def score_sets(task: L.LightningModule, sets: list[RetentionSet], runner: Optional[Runner] = None
               ) -> dict[str, dict[str, float]]:
    """Scores retention sets on a task's current weights, outside a fit (e.g. a checkpoint against its base).

    Args:
        task: a task with its model built (`configure_model()` called; `setup` too for alignment tasks).
        sets: the sets to score.
        runner: device and precision; default: the task's device, plain precision.

    Returns:
        {set name: {metric: value}}.
    """
    runner = runner or Runner(task.device)
    for rset in sets:
        check_source(rset)
    return {rset.name: build_scorer(rset, task, runner).score(task) for rset in sets}
