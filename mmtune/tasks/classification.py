"""Image classification (multi-class and multi-label) with any timm or torchvision backbone."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from mmtune.adapters import AdapterReport, apply_adapter, lora_plus_scale, merge_adapter
from mmtune.errors import ConfigError, DataError
from mmtune.evaluation.calibration import calibrate, parse_operating_point, positive_index
from mmtune.files import atomic_write, update_json
from mmtune.metrics.classification import ClassificationMetrics, write_confusion_matrix
from mmtune.metrics.records import SampleRecord
from mmtune.models.vision import (
    CLASSIFIER_FAMILIES,
    VisionClassifier,
    block_names,
    build_classifier,
    classifier_data_config,
    resolve_classifier_ref,
)
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec, as_spec, spec_to_dict
from mmtune.tasks import common

PARTS_DOC = {"backbone": "everything but the head", "head": "the classification layer"}


@common.TASKS.register("image_classification")
class ImageClassificationTask(common.RunHooks, L.LightningModule):
    """Fine-tunes an image classifier: full, linear probe, last-N blocks, or adapters (LoRA, DoRA, IA3).

    Args:
        model: the backbone (timm or torchvision name, hub id, local directory or weights file).
        adapter: adapters and per-part freezing; parts are `backbone` and `head`.
        optimizer: AdamW settings, schedule, layer-wise decay, per-part learning rates.
        monitor: best-checkpoint and early-stopping metric.
        classes: the class list; normally taken from the training data (and saved in checkpoints).
        multi_label: sigmoid outputs with per-class thresholds; None takes it from the data.
        class_weights: loss weights per class, `balanced` (inverse frequency; positive weights for
            multi-label), or None.
        label_smoothing: label smoothing for multi-class cross entropy.
        thresholds: multi-label decision threshold, one for all or one per class (an
            `operating_point` replaces them with thresholds chosen on validation).
        calibration: `temperature` fits temperature scaling on the validation logits at every
            validation; the temperature is saved with the weights and applied by test, predict and
            export (argmax and AUROC do not change, probabilities and calibration error do).
        operating_point: decision thresholds chosen on validation at every validation and saved
            with the weights: `{sensitivity: 0.95}` (the highest threshold reaching it),
            `{specificity: 0.9}` (the lowest), `max_f1` or `youden`; per class for multi-label
            tasks, on the positive class for binary ones (`positive: <class>`, default the
            second class). Refused for more than two exclusive classes.
        checkpoint_weights: what checkpoints hold: `trainable` (adapters, trained parts, buffers:
            small files; frozen weights reload from the base model), `full`, or `auto` (trainable
            when something is frozen and the base weights can be reloaded).
        predictions_file: where `predict` writes its CSV (default: `predictions.csv` in the run directory).
    """

    untuned_baseline = False  # the head trains from scratch: `mmtune evaluate --baseline base` is meaningless

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(),
        monitor: MonitorSpec = MonitorSpec(),
        classes: Optional[list[str]] = None,
        multi_label: Optional[bool] = None,
        class_weights: Union[None, Literal["balanced"], list[float]] = None,
        label_smoothing: float = 0.0,
        thresholds: Union[float, list[float]] = 0.5,
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        predictions_file: Optional[str] = None,
        calibration: Literal["none", "temperature"] = "none",
        operating_point: Union[None, str, dict[str, Union[float, str, bool]]] = None,
    ) -> None:
        super().__init__()
        self.model_spec = as_spec(ModelSpec, model)
        self.adapter_spec = as_spec(AdapterSpec, adapter)
        self.optimizer_spec = as_spec(OptimizerSpec, optimizer)
        self.monitor_spec = as_spec(MonitorSpec, monitor)
        resolve_classifier_ref(self.model_spec)  # fail at construction on an unknown model name
        self.operating_point = parse_operating_point(operating_point)
        self.save_hyperparameters({
            "model": spec_to_dict(self.model_spec), "adapter": spec_to_dict(self.adapter_spec),
            "optimizer": spec_to_dict(self.optimizer_spec), "monitor": spec_to_dict(self.monitor_spec),
            "classes": list(classes) if classes else None, "multi_label": multi_label,
            "class_weights": class_weights, "label_smoothing": label_smoothing, "thresholds": thresholds,
            "checkpoint_weights": checkpoint_weights, "predictions_file": predictions_file,
            "calibration": calibration, "operating_point": operating_point,
        })
        self.net: Optional[torch.nn.Module] = None
        self.classifier: Optional[VisionClassifier] = None
        self.adapter_report: Optional[AdapterReport] = None
        self._predictions: list[tuple[int, list[float]]] = []
        self._test_logits: list[tuple[list[int], torch.Tensor]] = []
        self._val_outputs: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        self._calibration: Optional[dict] = None  # what was fitted on validation for the current weights
        self._positive: Optional[int] = None

    # ---- build -------------------------------------------------------------------------------------
    def _trainable_only(self) -> bool:
        return common.saves_trainable_only(self.hparams.checkpoint_weights, self.adapter_spec,
                                           self.model_spec.pretrained or bool(self.model_spec.checkpoint))

    @property
    def classes(self) -> list[str]:
        if not self.hparams.classes:
            raise ConfigError("the class list is unknown: fit on labeled data, load a checkpoint, or set model.classes")
        return list(self.hparams.classes)

    @property
    def data_config(self) -> dict:
        """Input size and normalization of the backbone's weights (from the factory, no weights loaded)."""
        return classifier_data_config(self.model_spec)

    def setup(self, stage: str) -> None:
        """Takes the class list from the data (unless fixed by config or checkpoint) and connects the data."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is None:
            return
        if not self.hparams.classes:
            if not dm.classes:
                raise DataError("the data module found no classes; fit on labeled data first")
            self.hparams.classes = list(dm.classes)
        elif stage == "fit" and dm.classes and not set(dm.classes) <= set(self.hparams.classes):
            # A training set may lack some of the listed classes (a federated site, a continual stage
            # with replay): the head keeps the listed order; only a class outside the list is an error.
            raise DataError(f"model.classes {self.hparams.classes} differ from the training data's classes {dm.classes}")
        if self.hparams.multi_label is None:
            self.hparams.multi_label = bool(dm.multi_label)
        if self.hparams.class_weights == "balanced":
            if stage != "fit":
                raise ConfigError("class_weights: balanced needs the training data; run fit first")
            self.hparams.class_weights = self._balanced_weights(dm.class_counts)
        dm.connect(self.classes, self.hparams.multi_label, self.data_config)

    def _balanced_weights(self, counts: list[int]) -> list[float]:
        total, k = sum(counts), len(counts)
        if self.hparams.multi_label:
            n = len(self.trainer.datamodule.splits["train"])
            return [(n - c) / c if c else 1.0 for c in counts]
        return [total / (k * c) if c else 0.0 for c in counts]

    def configure_model(self) -> None:
        if self.net is not None:
            return
        classes = self.classes
        clf = build_classifier(self.model_spec, len(classes))
        family = CLASSIFIER_FAMILIES.get(clf.family)
        self.net, self.adapter_report = apply_adapter(
            clf.module, self.adapter_spec, clf.family,
            parts={"backbone": None, "head": clf.head},
            default_policies={"backbone": "adapter", "head": "full"},
            layer_ids=lambda raw: family.layer_ids(raw, clf.head),
        )
        self.classifier = clf
        rank_zero_info(f"[mmtune] {self.model_spec.name}: {self.adapter_report.summary()}")
        if self._device_mesh is not None:  # ModelParallelStrategy (FSDP2)
            raw = self._raw()
            blocks = [raw.get_submodule(b) for b in block_names(raw) if b not in clf.head]
            common.shard_fsdp2(self.net, self.device_mesh, blocks)
            rank_zero_info(f"[mmtune] FSDP2: {len(blocks)} blocks and the root sharded over {self.device_mesh.size()} processes")
        multi = bool(self.hparams.multi_label)
        thresholds = self.hparams.thresholds
        if isinstance(thresholds, list) and len(thresholds) != len(classes):
            raise ConfigError(f"thresholds has {len(thresholds)} values for {len(classes)} classes")
        self._positive = positive_index(self.operating_point, classes, multi)
        self.val_metrics = ClassificationMetrics(len(classes), multi, thresholds)
        self.test_metrics = ClassificationMetrics(len(classes), multi, thresholds, confusion=True, positive=self._positive)
        # Fitted on validation for the current weights (`_calibrate`); persistent buffers, so every
        # checkpoint (trainable-only ones too) holds the values fitted on its own weights.
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("decision_thresholds", self.val_metrics.thresholds.clone())
        weights = self.hparams.class_weights
        if isinstance(weights, list):
            if len(weights) != len(classes):
                raise ConfigError(f"class_weights has {len(weights)} values for {len(classes)} classes")
            self.register_buffer("loss_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        else:
            self.loss_weights = None

    def _raw(self) -> torch.nn.Module:
        return self.net.get_base_model() if self.adapter_spec.method != "none" else self.net

    # ---- steps -------------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def loss_terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.hparams.multi_label:
            return {"bce": F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=self.loss_weights)}
        return {"ce": F.cross_entropy(logits, target, weight=self.loss_weights, label_smoothing=self.hparams.label_smoothing)}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: sigmoid or softmax of logits / temperature."""
        z = logits.float() / self.temperature
        return z.sigmoid() if self.hparams.multi_label else z.softmax(dim=-1)

    def _calibrates(self) -> bool:
        return self.hparams.calibration != "none" or self.operating_point is not None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(self(batch["pixels"]), batch["target"])
        loss = sum(terms.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["pixels"]))
        self.log_dict({f"train/{name}": value for name, value in terms.items()}, batch_size=len(batch["pixels"]))
        return loss

    def _eval_step(self, batch: dict, metrics: ClassificationMetrics, stage: str,
                   temperature: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self(batch["pixels"])
        loss = sum(self.loss_terms(logits, batch["target"]).values())
        self.log(f"{stage}/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(logits))
        metrics.update(logits if temperature is None else logits.float() / temperature, batch["target"])
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Validation metrics (which pick the best checkpoint) stay at the configured thresholds and
        # T = 1; the logits are kept to fit this epoch's temperature and thresholds afterwards.
        logits = self._eval_step(batch, self.val_metrics, "val")
        if self._calibrates():  # only then: the gather of every validation logit is not free on large sets
            self._val_outputs.append((batch["index"].tolist(), logits.detach().float().cpu(),
                                      batch["target"].detach().cpu()))

    def on_test_epoch_start(self) -> None:
        self.test_metrics.thresholds.copy_(self.decision_thresholds)  # as loaded with the checkpoint

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits = self._eval_step(batch, self.test_metrics, "test", self.temperature)
        self._test_logits.append((batch["index"].tolist(), logits.detach().float().cpu()))

    def _log_metrics(self, metrics: ClassificationMetrics, stage: str) -> dict:
        values = metrics.compute()  # synchronized across processes by torchmetrics
        for name, value in values.items():
            if name == "confusion":
                continue
            if value.ndim == 0:
                self.log(f"{stage}/{name}", value, prog_bar=name in ("accuracy", "f1_macro"), sync_dist=True)
            else:
                for cls, v in zip(self.classes, value):
                    self.log(f"{stage}/{name}/{cls}", v, sync_dist=True)
        metrics.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")
        outputs, self._val_outputs = self._val_outputs, []
        if self._calibrates() and not self.trainer.sanity_checking:
            self._calibrate(outputs)

    def _calibrate(self, outputs: list[tuple[list[int], torch.Tensor, torch.Tensor]]) -> None:
        """Fits the temperature and chooses the operating point's thresholds on this validation's
        logits (from every process, so all ranks set the same values), and logs the calibration error."""
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, logits, target in common.gather_objects(outputs):
            for i, z, t in zip(index, logits, target):
                rows.setdefault(i, (z, t))  # a distributed sampler's padding repeats samples
        if not rows:
            return
        order = sorted(rows)
        fitted = calibrate(torch.stack([rows[i][0] for i in order]).numpy(),
                           torch.stack([rows[i][1] for i in order]).numpy(), self.classes,
                           bool(self.hparams.multi_label), self.hparams.calibration == "temperature",
                           self.operating_point, self.val_metrics.thresholds.tolist())
        # Every rank fitted the same values; sync_dist only keeps Lightning's epoch-level logging rule.
        self.log("val/ece", fitted.ece_before, sync_dist=True)
        if self.hparams.calibration == "temperature":
            self.log("val/ece_calibrated", fitted.ece_after, sync_dist=True)
            self.log("val/temperature", fitted.temperature, sync_dist=True)
        self.temperature.fill_(fitted.temperature)
        for name, value in fitted.thresholds.items():
            self.decision_thresholds[self.classes.index(name)] = value
        self._calibration = {**fitted.as_dict(), "epoch": self.current_epoch, "step": self.global_step}

    def on_fit_end(self) -> None:
        """The `calibration` entry of metrics.json: what the best checkpoint holds (fitted on its weights)."""
        out = common.run_dir(self.trainer)
        if not self._calibrates() or out is None or not self.trainer.is_global_zero:
            return
        entry = self._calibration
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or ""
        if best and Path(best).is_file():
            saved = common.read_checkpoint(best).get("mmtune_calibration")
            entry = {**saved, "checkpoint": best} if saved else entry
        if entry:
            update_json(out / "metrics.json", "calibration", entry)

    def on_test_epoch_end(self) -> None:
        values = self._log_metrics(self.test_metrics, "test")
        out = common.run_dir(self.trainer)
        if out is not None and self.trainer.is_global_zero:
            write_confusion_matrix(values["confusion"], self.classes, out, "test",
                                   str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None)
        self._publish_records("test", self._test_logits)
        self._test_logits = []

    def _publish_records(self, stage: str, batches: list[tuple[list[int], torch.Tensor]]) -> None:
        """One record per image: its manifest row, true and predicted class indices, raw logits and
        metadata columns (the evaluation room computes intervals, subgroups and calibration from them)."""
        samples = self.trainer.test_dataloaders.dataset.samples if stage == "test" else \
            self.trainer.val_dataloaders.dataset.samples
        index = {c: i for i, c in enumerate(self.classes)}
        metrics = self.test_metrics if stage == "test" else self.val_metrics
        temperature = float(self.temperature)
        records = []
        for rows, logits in batches:
            predicted = metrics.predict(logits / temperature)
            for i, row_logits, row_pred in zip(rows, logits, predicted):
                s = samples[i]
                pred = row_pred.nonzero().flatten().tolist() if self.hparams.multi_label else [int(row_pred)]
                meta = {**s.meta, "path": s.path, **({"group": s.group} if s.group is not None else {})}
                records.append(SampleRecord(id=s.origin or s.path, target=[index[c] for c in s.labels],
                                            prediction=pred, scores=row_logits.tolist(), meta=meta))
        thresholds: list = metrics.thresholds.tolist()
        if self._positive is not None:  # a binary operating point thresholds the positive class only
            thresholds = [t if c == self._positive else None for c, t in enumerate(thresholds)]
        common.publish_records(self, stage, "classification", records, {
            "classes": self.classes, "multi_label": bool(self.hparams.multi_label), "thresholds": thresholds,
            "temperature": temperature,
            "operating_point": self.operating_point.as_dict() if self.operating_point else None,
            "calibration": self._calibration if self._calibrates() else None})

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        probs = self.probabilities(self(batch["pixels"]))
        self._predictions += list(zip(batch["index"].tolist(), probs.cpu().tolist()))
        return probs

    def on_predict_epoch_end(self) -> None:
        rows = dict(common.gather_objects(self._predictions))  # duplicates from padded sampling collapse
        self._predictions = []
        out = common.run_dir(self.trainer)
        if not self.trainer.is_global_zero:
            return
        target = self.hparams.predictions_file or str((out or Path(".")) / "predictions.csv")
        samples = self.trainer.predict_dataloaders.dataset.samples
        thresholds = self.decision_thresholds.tolist() if self.hparams.multi_label or self._positive is not None else None
        write_predictions(Path(target), [(samples[i].path, rows[i]) for i in sorted(rows)], self.classes, thresholds,
                          self._positive)
        rank_zero_info(f"[mmtune] wrote {len(rows)} predictions to {target}")

    # ---- optimization, callbacks, checkpoints --------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._calibration is not None:
            checkpoint["mmtune_calibration"] = self._calibration

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.setdefault("state_dict", {})
        for name in ("temperature", "decision_thresholds"):  # checkpoints from before calibration
            if hasattr(self, name) and name not in state:
                state[name] = getattr(self, name).detach().clone()
        self._calibration = checkpoint.get("mmtune_calibration")
        super().on_load_checkpoint(checkpoint)

    def configure_optimizers(self) -> dict:
        clf = self.classifier
        raw = self._raw()
        head = clf.head

        def part_of(name: str) -> str:
            return "head" if any(name == h or name.startswith(h + ".") for h in head) else "backbone"

        no_decay = raw.no_weight_decay() if hasattr(raw, "no_weight_decay") else ()
        layer_ids = CLASSIFIER_FAMILIES.get(clf.family).layer_ids(raw, head) if self.optimizer_spec.layer_decay else None
        return common.adamw_with_schedule(
            self.trainer, raw.named_parameters(), self.optimizer_spec,
            layer_ids=layer_ids, part_of=part_of, part_names=PARTS_DOC, no_decay=no_decay,
            lr_scale=lora_plus_scale(self.adapter_spec),
        )

    # ---- export --------------------------------------------------------------------------------------
    def export(self, out_dir: str) -> Path:
        """Merges adapters and writes the backbone family's native format (timm: model.safetensors +
        config.json loadable with `timm.create_model("local-dir:...")`)."""
        out = Path(out_dir)
        merged = merge_adapter(copy.deepcopy(self.net)).eval()
        clf = VisionClassifier(merged, self.classifier.family, self.classifier.head, self.classifier.data_config,
                               self.classifier.arch)
        CLASSIFIER_FAMILIES.get(clf.family).export(clf, out, self.classes)
        (out / "mmtune.json").write_text(json.dumps({
            "task": "image_classification", "classes": self.classes, "multi_label": bool(self.hparams.multi_label),
            **self.decision_rule(), "source_model": self.model_spec.name,
        }, indent=2))
        return out

    def decision_rule(self) -> dict:
        """How probabilities and decisions are made from logits, for exports: `p = sigmoid(z / T)` (or
        softmax); multi-label: class c when `p_c >= thresholds[c]`; binary with an operating point: the
        positive class when its `p >= thresholds[positive]`; otherwise argmax."""
        classes, t = self.classes, self.decision_thresholds.tolist()
        decided = range(len(classes)) if self.hparams.multi_label else \
            ([self._positive] if self._positive is not None else [])
        return {"temperature": float(self.temperature), "thresholds": {classes[c]: t[c] for c in decided} or None,
                "positive_class": classes[self._positive] if self._positive is not None else None,
                "operating_point": self.operating_point.as_dict() if self.operating_point else None}


def write_predictions(path: Path, rows: list[tuple[str, list[float]]], classes: list[str],
                      thresholds: Optional[list[float]] = None, positive: Optional[int] = None) -> None:
    """One CSV row per image: path, predicted label(s) (`a|b` for multi-label, given `thresholds`; a
    binary task's `positive` class when its probability reaches its threshold), probability per class."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prediction", *[f"p_{c}" for c in classes]])
        for image, probs in rows:
            if thresholds is not None and positive is not None:
                label = classes[positive] if probs[positive] >= thresholds[positive] else classes[1 - positive]
            elif thresholds is not None:
                label = "|".join(c for c, p, t in zip(classes, probs, thresholds) if p >= t)
            else:
                label = classes[max(range(len(probs)), key=probs.__getitem__)]
            writer.writerow([image, label, *[f"{p:.6f}" for p in probs]])
