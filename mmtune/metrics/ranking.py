"""Ranking metrics (AUROC, average precision) from logits, weighted for bootstrap resampling.

Why not torchmetrics or scikit-learn on probabilities: float32 softmax saturates to exactly 1.0 for
confident samples (a third of a public chest X-ray test set), which creates ties that are not in the
model, so the two per-class AUROCs of a binary task came out different (0.907 and 0.910). Ranking is
done here on float64 log-odds computed from the logits, which never saturate, and every metric takes
per-sample weights so that one sort serves a thousand bootstrap resamples (a resample is a vector of
counts over the samples).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def class_log_odds(logits, multi_label: bool) -> np.ndarray:
    """Per-class log-odds in float64: the score each one-vs-rest ranking uses.

    Multi-label outputs are independent sigmoids: the logit is the log-odds. Multi-class: the log-odds
    of class c under the softmax, `z_c - logsumexp(z_j, j != c)`; it orders samples exactly as the
    softmax probability does, without saturating (for two classes it is `z_1 - z_0` and its negative,
    so both classes get the same AUROC).
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be [samples, classes], got shape {z.shape}")
    if multi_label or z.shape[1] == 1:
        return z
    out = np.empty_like(z)
    for c in range(z.shape[1]):
        others = np.delete(z, c, axis=1)
        top = others.max(axis=1)
        out[:, c] = z[:, c] - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))
    return out


def _as_weights(weights: Optional[np.ndarray], n: int) -> np.ndarray:
    if weights is None:
        return np.ones((1, n))
    w = np.asarray(weights, dtype=np.float64)
    return w[None, :] if w.ndim == 1 else w


def _weights_per_tie_group(scores, positive, weights, descending: bool) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Positive and negative weight of each run of equal scores, in score order: [B, groups] each
    (None for no samples). Ties form one group: one threshold, never an order the model did not give."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    w = _as_weights(weights, len(scores))
    order = np.argsort(-scores if descending else scores, kind="stable")
    s = scores[order]
    if not len(s):
        return None
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos, wo = positive[order], w[:, order]
    return np.add.reduceat(wo * pos, starts, axis=1), np.add.reduceat(wo * ~pos, starts, axis=1)


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Area under the ROC curve for each row of `weights` (ties count one half).

    Args:
        scores: [N] higher means more likely positive.
        positive: [N] bool.
        weights: [B, N] or [N] sample weights (bootstrap counts); None weighs every sample once.

    Returns:
        [B] AUROC values; NaN where a row has no positive or no negative weight.
    """
    groups = _weights_per_tie_group(scores, positive, weights, descending=False)
    if groups is None:
        return np.full(len(_as_weights(weights, 0)), np.nan)
    p, n = groups
    below = np.cumsum(n, axis=1) - n
    num = (p * (below + 0.5 * n)).sum(axis=1)
    den = p.sum(axis=1) * n.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_average_precision(scores: np.ndarray, positive: np.ndarray, weights: Optional[np.ndarray] = None
                               ) -> np.ndarray:
    """Average precision (scikit-learn's step definition: sum over thresholds of recall gained times
    precision), tied scores forming one threshold, for each row of `weights`. NaN without positives."""
    groups = _weights_per_tie_group(scores, positive, weights, descending=True)
    if groups is None:
        return np.full(len(_as_weights(weights, 0)), np.nan)
    tp, fp = (np.cumsum(g, axis=1) for g in groups)
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        gained = np.diff(np.concatenate([np.zeros_like(total), tp], axis=1), axis=1) / total
        ap = (gained * precision).sum(axis=1)
    return np.where(total[:, 0] > 0, ap, np.nan)
