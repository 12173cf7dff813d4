"""Classification metrics: accuracy, macro-F1, AUROC (macro and per class), per-class sensitivity and
specificity, and the confusion matrix, for multi-class and multi-label problems.

The counting metrics are torchmetrics'; AUROC is ranked on float64 log-odds from the logits
(`mmtune.metrics.ranking`), since probabilities saturate and tie in float32."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torchmetrics import ConfusionMatrix, Metric, MetricCollection
from torchmetrics.classification import Accuracy, F1Score, Recall, Specificity

from mmtune.files import atomic_write
from mmtune.metrics.ranking import class_log_odds, weighted_auroc


class LogOddsAUROC(Metric):
    """One-vs-rest AUROC per class from logits (kept whole: AUROC needs every score), synchronized
    across processes by torchmetrics. Classes without positives or negatives give NaN and are left
    out of the macro mean."""

    full_state_update = False

    def __init__(self, multi_label: bool) -> None:
        super().__init__()
        self.multi_label = multi_label
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.logits.append(logits.detach().double())
        self.target.append(target.detach().long())

    def compute(self) -> dict[str, torch.Tensor]:
        logits = torch.cat(self.logits) if isinstance(self.logits, list) else self.logits
        target = torch.cat(self.target) if isinstance(self.target, list) else self.target
        odds = class_log_odds(logits.cpu().numpy(), self.multi_label)
        t = target.cpu().numpy()
        per_class = [weighted_auroc(odds[:, c], t[:, c] > 0 if self.multi_label else t == c)[0]
                     for c in range(odds.shape[1])]
        values = torch.tensor(per_class, dtype=torch.float32)
        finite = values[~values.isnan()]
        return {"auroc": values, "auroc_macro": finite.mean() if len(finite) else torch.tensor(float("nan"))}


class ClassificationMetrics(nn.Module):
    """Updates from logits; thresholds multi-label probabilities per class before the counting metrics.

    torchmetrics takes one threshold for all labels, so per-class thresholds are applied here and
    the counting metrics receive 0/1 predictions; AUROC always sees the raw logits. A binary
    multi-class task with a `positive` class decides by that class's probability and threshold (an
    operating point) instead of argmax.
    """

    def __init__(self, num_classes: int, multi_label: bool, thresholds: Union[float, Sequence[float]] = 0.5,
                 confusion: bool = False, positive: Optional[int] = None) -> None:
        super().__init__()
        task = "multilabel" if multi_label else "multiclass"
        n = dict(num_labels=num_classes) if multi_label else dict(num_classes=num_classes)
        micro = "micro"
        counting = {
            "accuracy": Accuracy(task=task, average=micro, **n),
            "f1_macro": F1Score(task=task, average="macro", **n),
            "sensitivity": Recall(task=task, average=None, **n),
            "specificity": Specificity(task=task, average=None, **n),
        }
        if confusion:
            counting["confusion"] = ConfusionMatrix(task=task, **n)
        self.counting = MetricCollection(counting)
        self.ranking = LogOddsAUROC(multi_label)
        self.multi_label = multi_label
        self.positive = positive if not multi_label and num_classes == 2 else None
        t = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        self.register_buffer("thresholds", t.expand(num_classes).clone() if t.numel() == 1 else t, persistent=False)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """0/1 predictions (multi-label) or class indices (multi-class)."""
        if self.multi_label:
            return (logits.float().sigmoid() >= self.thresholds).long()
        if self.positive is not None:
            p = logits.float().softmax(dim=-1)[:, self.positive]
            return torch.where(p >= self.thresholds[self.positive], self.positive, 1 - self.positive)
        return logits.argmax(dim=-1)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long()
        self.counting.update(self.predict(logits), target)
        self.ranking.update(logits, target)

    def compute(self) -> dict[str, torch.Tensor]:
        return {**self.counting.compute(), **self.ranking.compute()}

    def reset(self) -> None:
        self.counting.reset()
        self.ranking.reset()


def write_confusion_matrix(matrix: torch.Tensor, classes: Sequence[str], out_dir: Path, split: str = "test",
                           checkpoint: str | None = None) -> list[Path]:
    """Writes `confusion_matrix.csv` (counts), `confusion_matrix_normalized.csv` (each true class's
    row as shares) and `.png` (both views side by side, titled with the split and checkpoint).

    Rows: true class, columns: predicted class. A multi-label (L, 2, 2) matrix is written as one row
    per label: tn, fp, fn, tp (normalized: as shares of the label's negatives, resp. positives).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    m = matrix.detach().cpu().long()
    if m.ndim == 3:
        header, rows, cols = ["label", "tn", "fp", "fn", "tp"], m.reshape(len(classes), 4).numpy(), ["tn", "fp", "fn", "tp"]
        totals = np.stack([rows[:, 0] + rows[:, 1]] * 2 + [rows[:, 2] + rows[:, 3]] * 2, axis=1)
    else:
        header, rows, cols = ["true \\ predicted", *classes], m.numpy(), list(classes)
        totals = rows.sum(axis=1, keepdims=True).repeat(rows.shape[1], axis=1)
    shares = np.divide(rows, totals, out=np.zeros(rows.shape), where=totals > 0)
    paths = []
    for name, grid, fmt in (("confusion_matrix.csv", rows, str), ("confusion_matrix_normalized.csv", shares,
                                                                    lambda v: f"{v:.4f}")):
        path = out_dir / name
        with atomic_write(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for c, row in zip(classes, grid):
                writer.writerow([c, *(fmt(v) for v in row)])
        paths.append(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * max(len(classes), len(cols)) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, grid, label, fmt in ((axes[0], rows, "counts", str), (axes[1], shares, "share of the true class",
                                                                      lambda v: f"{v:.2f}")):
        ax.imshow(grid, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), list(classes))
        ax.set_xlabel("predicted" if m.ndim == 2 else "outcome")
        ax.set_ylabel("true" if m.ndim == 2 else "label")
        dark = grid.max() / 2 if grid.size else 0
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, fmt(v), ha="center", va="center", color="white" if v > dark else "black")
        ax.set_title(label)
    where = f"{split} split" + (f", checkpoint {Path(checkpoint).name}" if checkpoint else "")
    fig.suptitle(f"confusion matrix: {where}")
    fig.tight_layout()
    png = out_dir / "confusion_matrix.png"
    with atomic_write(png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return [*paths, png]
