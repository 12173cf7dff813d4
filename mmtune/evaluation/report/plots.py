"""The report's figures: matplotlib (Agg backend, no display needed) rendered to base64 PNG for
embedding, and image thumbnails as base64 JPEG. Each function takes plain arrays or dicts and
returns the encoded image, so the page builders never touch matplotlib.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PALETTE = ["#2563eb", "#e8590c", "#0ca678", "#c2255c", "#7048e8", "#1098ad", "#f59f00", "#5c940d", "#862e9c",
           "#495057"]
GOOD, BAD, WARN, NEUTRAL = "#137a3c", "#b42318", "#d97706", "#667085"
MAX_CURVE_CLASSES = 10  # beyond this a ROC plot is a tangle; the table still has every class


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.color": "#e3e7ee", "grid.linewidth": 0.8,
                         "axes.edgecolor": "#98a2b3", "axes.titleweight": "bold", "axes.titlesize": 11,
                         "legend.frameon": False, "legend.fontsize": 9})
    return plt


def to_png(fig) -> str:
    """The figure as base64 PNG (closed afterwards: a report draws many and keeps none)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(curves: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[key]) for row in curves if key in row and "step" in row]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(curves: list[dict], losses: Sequence[str], scores: Sequence[str],
                    best_step: Optional[float]) -> str:
    """Loss terms (left) and validation scores (right) against the optimizer step; the best
    checkpoint's step as a dashed line."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(11 if scores else 6, 3.6), squeeze=False)
    panels = [(axes[0][0], losses, "loss")] + ([(axes[0][1], scores, "validation scores")] if scores else [])
    for ax, keys, title in panels:
        for i, key in enumerate(keys):
            x, y = _series(curves, key)
            style = "-" if key.startswith("train/") and len(x) > 12 else "-o"
            ax.plot(x, y, style, color=PALETTE[i % len(PALETTE)], label=key, markersize=3.5, linewidth=1.6)
        if best_step is not None:
            ax.axvline(best_step, color=NEUTRAL, linestyle="--", linewidth=1, label="best checkpoint")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    return to_png(fig)


def roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall (recall, precision) points, one per distinct score.

    By hand (a cumulative count over the sorted scores) because the scores are float64 log-odds
    (`mmtune.metrics.ranking.class_log_odds`): torchmetrics' curves squash scores outside [0, 1]
    with a sigmoid, which saturates and ties confident samples the model did not tie, and
    scikit-learn is not a dependency of mmtune. Ties form one point, as in the AUROC.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tp, fp = np.cumsum(y)[ends].astype(np.float64), np.cumsum(~y)[ends].astype(np.float64)
    p, n = max(float(y.sum()), 1.0), max(float((~y).sum()), 1.0)
    fpr, tpr = np.r_[0.0, fp / n], np.r_[0.0, tp / p]
    recall, precision = tp / p, tp / np.maximum(tp + fp, 1.0)
    # The precision-recall curve ends where recall first reaches its maximum: lower thresholds only
    # add negatives (precision falls to the prevalence at the same recall).
    last = int(np.argmax(recall >= recall[-1])) + 1 if len(recall) else 0
    recall, precision = recall[:last], precision[:last]
    return fpr, tpr, np.r_[0.0, recall], np.r_[precision[0] if len(precision) else 1.0, precision]


def roc_pr(odds: np.ndarray, target: np.ndarray, classes: Sequence[str], shown: Sequence[int],
           auroc: dict[str, Optional[float]], ap: dict[str, Optional[float]]) -> str:
    """ROC and precision-recall curves, one line per class in `shown` (one-vs-rest on log-odds)."""
    plt = _plt()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, c in enumerate(shown):
        y = target[:, c]
        if not y.any() or y.all():
            continue  # no positives or no negatives: no curve (the table says so)
        fpr, tpr, recall, precision = roc_points(odds[:, c], y)
        color = PALETTE[i % len(PALETTE)]
        name = classes[c]
        roc.plot(fpr, tpr, color=color, linewidth=1.8, label=f"{name} (AUROC {_num(auroc.get(name))})")
        pr.step(recall, precision, where="post", color=color, linewidth=1.8, label=f"{name} (AP {_num(ap.get(name))})")
        pr.axhline(y.mean(), color=color, linewidth=0.8, linestyle=":", alpha=0.8)
    roc.plot([0, 1], [0, 1], color="#c4cad4", linestyle="--", linewidth=1)
    roc.set(title="ROC", xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
            xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    pr.set(title="precision-recall (dotted: prevalence)", xlabel="recall (sensitivity)", ylabel="precision",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.03))
    roc.legend(loc="lower right")
    pr.legend(loc="lower left")
    fig.tight_layout()
    return to_png(fig)


def _num(x: Optional[float]) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3f}"


def reliability(panels: Sequence[tuple[str, list[dict], Optional[float]]]) -> str:
    """Reliability diagrams: per confidence bin, how often the model was right against how sure it
    was (bars), the diagonal of perfect calibration, and how many decisions fall in each bin."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), squeeze=False)
    for ax, (title, bins, ece) in zip(axes[0], panels):
        width = [b["upper"] - b["lower"] for b in bins]
        left = [b["lower"] for b in bins]
        acc = [b["accuracy"] if b.get("count") else 0.0 for b in bins]
        conf = [b["confidence"] if b.get("count") else None for b in bins]
        ax.bar(left, acc, width=width, align="edge", color="#93b4f5", edgecolor="#2563eb", linewidth=0.8,
               label="observed accuracy")
        for lo, w, a, c in zip(left, width, acc, conf):
            if c is not None:  # the gap to the diagonal at the bin's mean confidence
                ax.plot([lo + w / 2] * 2, [a, c], color=BAD, linewidth=2, alpha=0.7)
        ax.plot([0, 1], [0, 1], color=NEUTRAL, linestyle="--", linewidth=1, label="perfect calibration")
        counts = [b.get("count") or 0 for b in bins]
        total = max(sum(counts), 1)
        twin = ax.twinx()
        twin.bar([lo + w / 2 for lo, w in zip(left, width)], [c / total for c in counts], width=[w * 0.35 for w in width],
                 color="#f59f00", alpha=0.55, label="share of decisions")
        twin.set_ylim(0, 4)  # keep the histogram in the lower quarter
        twin.set_yticks([])
        twin.grid(False)
        twin.spines["right"].set_visible(False)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence", ylabel="accuracy",
               title=f"{title} (ECE {_num(ece)})")
        handles = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left")
    fig.tight_layout()
    return to_png(fig)


def dots(rows: Sequence[tuple[str, Optional[float], Optional[float], Optional[float], str]], xlabel: str,
         reference: Optional[float] = None, reference_label: str = "") -> str:
    """A dot-and-whisker chart, one row per label: value with its interval, coloured by tone
    (`good`, `bad`, `warn`, other); `reference` as a dashed vertical line (0, the overall value)."""
    plt = _plt()
    tones = {"good": GOOD, "bad": BAD, "warn": WARN}
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.2))
    for i, (label, value, lo, hi, tone) in enumerate(rows):
        if value is None:
            continue
        color = tones.get(tone, PALETTE[0])
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [i, i], color=color, linewidth=2.2, alpha=0.8, solid_capstyle="round")
        ax.plot([value], [i], "o", color=color, markersize=7)
    if reference is not None:
        ax.axvline(reference, color=NEUTRAL, linestyle="--", linewidth=1, label=reference_label or None)
        if reference_label:
            ax.legend(loc="best")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", visible=False)
    fig.tight_layout()
    return to_png(fig)


def thumbnail(path: Path, size: int = 200) -> str:
    """The image at `path` as a base64 JPEG at most `size` pixels on a side (16-bit and float images
    are stretched to 8 bits by their own range, as a viewer would)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(img, dtype=np.float64)
            lo, hi = np.nanmin(a), np.nanmax(a)
            img = Image.fromarray(((a - lo) / (hi - lo or 1.0) * 255).astype(np.uint8))
        img = img.convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")
