"""Verification of an export: the exported file in its runtime against the trained network in torch,
on the same preprocessed validation images (max abs logit difference, label agreement), and test
accuracy of both where the test split is known."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from mmtune.errors import ExportError

FP32_TOLERANCE = 1e-3  # max abs logit difference of a float export (float32 reorderings give ~1e-6)
INT8_MIN_AGREEMENT = 0.9  # share of validation images whose int8 label equals the trained model's
INT8_MIN_COSINE = 0.95  # embedding towers: mean cosine of int8 to trained embeddings (dynamic int8 gives ~0.999)


@dataclass
class Agreement:
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    label_agreement: float


@dataclass
class Accuracy:
    images: int
    trained: float
    exported: float


def compare(reference: Callable[[np.ndarray], np.ndarray], exported: Callable[[np.ndarray], np.ndarray],
            batches: list[np.ndarray]) -> Agreement:
    """Runs both on every batch and compares logits and argmax labels."""
    diffs, agree, total, worst = [], 0, 0, 0.0
    for batch in batches:
        a, b = reference(batch), exported(batch)
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst = max(worst, float(d.max()))
        diffs.append(float(d.mean()))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(batch)
    return Agreement(total, worst, float(np.mean(diffs)) if diffs else 0.0, agree / total if total else 1.0)


def accuracy(reference, exported, batches: list[np.ndarray], targets: list[np.ndarray]) -> Optional[Accuracy]:
    """Test accuracy (argmax) of the trained network and of the export, or None without test data."""
    if not batches:
        return None
    y = np.concatenate(targets)
    ref = np.concatenate([reference(b).argmax(1) for b in batches])
    exp = np.concatenate([exported(b).argmax(1) for b in batches])
    return Accuracy(len(y), float((ref == y).mean()), float((exp == y).mean()))


def check(agreement: Agreement, quantized: bool, tolerance: float, min_agreement: float, name: str) -> None:
    """Raises ExportError when the export disagrees with the trained model beyond the tolerance
    (float: logits; int8: label agreement, since int8 logits differ by design)."""
    if quantized:
        if agreement.label_agreement < min_agreement:
            raise ExportError(f"{name}: int8 labels agree with the trained model on {agreement.label_agreement:.1%} of "
                              f"{agreement.images} validation images, under --min_agreement {min_agreement:.0%} "
                              "(export without --quantize, or calibrate on more images)")
    elif agreement.max_abs_diff > tolerance:
        raise ExportError(f"{name}: outputs differ from the trained model by up to {agreement.max_abs_diff:.3g} "
                          f"on {agreement.images} validation images (tolerance {tolerance:g}, --tolerance)")


def as_dict(value) -> Optional[dict]:
    return asdict(value) if value is not None else None
