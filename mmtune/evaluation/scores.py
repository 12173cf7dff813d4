"""Every task metric as a function of per-sample weights, built from a record set.

A metric here maps weights `[B, N]` (row b: how often each of the N samples is drawn in resample b;
all ones is the test set itself) to `[B]` values. One definition thus serves the point estimate, the
bootstrap interval and the paired comparison, and the value at all-ones equals what the task logged
(tests check it against torchmetrics). Counting metrics are weighted sums (matrix products); ranking
metrics re-rank with weights (`mmtune.metrics.ranking`); BLEU/chrF sum per-sample n-gram counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mmtune.errors import DataError
from mmtune.evaluation import text_stats
from mmtune.metrics.ranking import class_log_odds, weighted_auroc, weighted_average_precision
from mmtune.metrics.records import RecordSet
from mmtune.metrics.text import normalize_answer

ECE_BINS = 15


@dataclass(frozen=True)
class Metric:
    """A named metric over weighted samples.

    Attributes:
        name: as logged without the stage prefix (`accuracy`, `auroc/<class>`, `i2t_r@5`).
        fn: weights [B, N] -> values [B].
        higher_is_better: the direction of "better" (loss and calibration error: lower).
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    higher_is_better: bool = True


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _mean_of(values: np.ndarray, mask: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Weighted mean of a per-sample value (over the samples in `mask`)."""
    v = np.asarray(values, dtype=np.float64)
    m = np.ones_like(v) if mask is None else np.asarray(mask, dtype=np.float64)
    return lambda w: _ratio(w @ (v * m), w @ m)


def classification_arrays(records: RecordSet) -> dict[str, np.ndarray]:
    """Logits, one-hot targets and predictions of a classification record set as arrays."""
    classes = records.info.get("classes") or []
    k = len(classes)
    if any(r.scores is None or len(r.scores) != k for r in records.records):
        raise DataError(f"classification records need {k} logits per sample (one per class)")
    logits = np.array([r.scores for r in records.records], dtype=np.float64).reshape(len(records), k)
    target = np.zeros((len(records), k), dtype=bool)
    predicted = np.zeros((len(records), k), dtype=bool)
    for i, r in enumerate(records.records):
        target[i, list(r.target or [])] = True
        predicted[i, list(r.prediction or [])] = True
    return {"logits": logits, "target": target, "predicted": predicted}


def probabilities(logits: np.ndarray, multi_label: bool, temperature: float = 1.0) -> np.ndarray:
    """Softmax (or sigmoid) of logits / temperature, in float64."""
    z = logits / temperature
    if multi_label:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibration_error_terms(probs: np.ndarray, target: np.ndarray, multi_label: bool, bins: int = ECE_BINS
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample terms of the expected calibration error: [N, bins] (outcome - confidence) per bin,
    and [N] decisions per sample. ECE(w) = sum_b |w @ terms[:, b]| / (w @ decisions).

    Multi-class: the top-label ECE (confidence of the predicted class against being right);
    multi-label: every (sample, label) probability against the label.
    """
    n = len(probs)
    terms = np.zeros((n, bins))
    if multi_label:
        edges = np.minimum((probs * bins).astype(int), bins - 1)
        for b in range(bins):
            terms[:, b] = ((target - probs) * (edges == b)).sum(axis=1)
        return terms, np.full(n, probs.shape[1], dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = target[np.arange(n), probs.argmax(axis=1)].astype(np.float64)
    edges = np.minimum((confidence * bins).astype(int), bins - 1)
    terms[np.arange(n), edges] = correct - confidence
    return terms, np.ones(n)


def expected_calibration_error(terms: np.ndarray, decisions: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: _ratio(np.abs(w @ terms).sum(axis=1), w @ decisions)


def classification_metrics(records: RecordSet) -> list[Metric]:
    """accuracy, f1_macro, auroc_macro, ap_macro, ece (at the records' `temperature`; with a
    temperature other than 1 also `ece_uncalibrated`, at 1), and per class auroc, ap, sensitivity and
    specificity (of the records' predictions: at the operating point's thresholds when one was chosen).

    Same definitions as the task's torchmetrics: multi-label accuracy is over every (sample, label)
    decision; macro-F1 leaves out classes that neither occur nor are predicted.
    """
    a = classification_arrays(records)
    classes, multi = list(records.info["classes"]), bool(records.info.get("multi_label"))
    t, p = a["target"].astype(np.float64), a["predicted"].astype(np.float64)
    tp, fp, fn, tn = t * p, (1 - t) * p, t * (1 - p), (1 - t) * (1 - p)
    k = len(classes)
    if multi:
        accuracy = _mean_of(((tp + tn).sum(axis=1)) / k)
    else:
        accuracy = _mean_of(tp.sum(axis=1))

    def f1_macro(w: np.ndarray) -> np.ndarray:
        wtp, wfp, wfn = w @ tp, w @ fp, w @ fn
        den = 2 * wtp + wfp + wfn
        f1 = _ratio(2 * wtp, den)
        present = den > 0
        return _ratio(np.where(present, f1, 0.0).sum(axis=1), present.sum(axis=1).astype(np.float64))

    odds = class_log_odds(a["logits"], multi)
    temperature = float(records.info.get("temperature") or 1.0)
    terms, decisions = calibration_error_terms(probabilities(a["logits"], multi, temperature), a["target"], multi)
    metrics = [Metric("accuracy", accuracy), Metric("f1_macro", f1_macro),
               Metric("ece", expected_calibration_error(terms, decisions), higher_is_better=False)]
    if temperature != 1.0:  # temperature scaling: the error before it too, with its own interval
        raw_terms, _ = calibration_error_terms(probabilities(a["logits"], multi), a["target"], multi)
        metrics.append(Metric("ece_uncalibrated", expected_calibration_error(raw_terms, decisions),
                              higher_is_better=False))
    per_class_auroc = [lambda w, c=c: weighted_auroc(odds[:, c], a["target"][:, c], w) for c in range(k)]
    per_class_ap = [lambda w, c=c: weighted_average_precision(odds[:, c], a["target"][:, c], w) for c in range(k)]
    metrics += [Metric("auroc_macro", lambda w: _nanmean([f(w) for f in per_class_auroc])),
                Metric("ap_macro", lambda w: _nanmean([f(w) for f in per_class_ap]))]
    for c, name in enumerate(classes):
        metrics += [
            Metric(f"auroc/{name}", per_class_auroc[c]),
            Metric(f"ap/{name}", per_class_ap[c]),
            Metric(f"sensitivity/{name}", lambda w, c=c: _ratio(w @ tp[:, c], w @ (tp[:, c] + fn[:, c]))),
            Metric(f"specificity/{name}", lambda w, c=c: _ratio(w @ tn[:, c], w @ (tn[:, c] + fp[:, c]))),
        ]
    return metrics


def _nanmean(columns: list[np.ndarray]) -> np.ndarray:
    stacked = np.stack(columns, axis=1)
    finite = ~np.isnan(stacked)
    return _ratio(np.where(finite, stacked, 0.0).sum(axis=1), finite.sum(axis=1).astype(np.float64))


def token_loss_metrics(records: RecordSet) -> list[Metric]:
    """`loss` (per token over the whole set) and `perplexity`, from per-sample `loss_sum`/`tokens`."""
    have = [r for r in records.records if "loss_sum" in r.stats and "tokens" in r.stats]
    if len(have) != len(records):
        return []
    loss_sum = np.array([r.stats["loss_sum"] for r in records.records], dtype=np.float64)
    tokens = np.array([r.stats["tokens"] for r in records.records], dtype=np.float64)

    def loss(w: np.ndarray) -> np.ndarray:
        return _ratio(w @ loss_sum, w @ tokens)

    return [Metric("loss", loss, higher_is_better=False),
            Metric("perplexity", lambda w: np.exp(np.minimum(loss(w), 50.0)), higher_is_better=False)]


def generation_metrics(records: RecordSet) -> list[Metric]:
    """bleu4, rougeL, chrf of generated text against references; vqa_acc (overall and per answer
    type) for VQA (`info.vqa`; without it, when records carry accepted answers); the token loss when
    records carry it."""
    rows = [r for r in records.records if r.prediction is not None]
    metrics = token_loss_metrics(records)
    if len(rows) != len(records):  # generation was not run for every sample (e.g. only the loss)
        return metrics
    preds = [str(r.prediction) for r in records.records]
    refs = [str(r.target if r.target is not None else "") for r in records.records]
    bleu = np.stack([text_stats.bleu_stats(p, t) for p, t in zip(preds, refs)])
    chrf = np.stack([text_stats.chrf_stats(p, t) for p, t in zip(preds, refs)])
    rouge = np.array([text_stats.rouge_l(p, t) for p, t in zip(preds, refs)])
    metrics += [Metric("bleu4", lambda w: text_stats.bleu_from_stats(w @ bleu)),
                Metric("rougeL", _mean_of(rouge)),
                Metric("chrf", lambda w: text_stats.chrf_from_stats(w @ chrf))]
    vqa = records.info.get("vqa")  # the task says whether its data are questions; older records do not
    if vqa is None:
        vqa = any(r.meta.get("answers") for r in records.records)
    if vqa:
        hits = np.array([float(normalize_answer(p) in {normalize_answer(a) for a in (r.meta.get("answers") or [t])})
                         for p, t, r in zip(preds, refs, records.records)])
        metrics.append(Metric("vqa_acc", _mean_of(hits)))
        types = [str(r.meta.get("answer_type") or "").strip().lower() for r in records.records]
        for kind in sorted(set(types) - {""}):
            metrics.append(Metric(f"vqa_acc_{kind}", _mean_of(hits, np.array(types) == kind)))
    return metrics


def retrieval_metrics(records: RecordSet) -> list[Metric]:
    """Recall@K and MRR per direction from per-query ranks (records are queries; `meta.direction`
    names the direction, `stats.rank` is the 0-based rank of the best relevant item), their mean
    recall, and zero-shot accuracy where records carry `stats.zero_shot_correct`."""
    ks = list(records.info.get("recall_at") or (1, 5, 10))
    directions = list(dict.fromkeys(str(r.meta.get("direction")) for r in records.records))
    rank = np.array([r.stats.get("rank", np.nan) for r in records.records], dtype=np.float64)
    metrics, recalls = [], []
    for d in directions:
        mask = np.array([str(r.meta.get("direction")) == d for r in records.records])
        for k in ks:
            recalls.append(_mean_of(rank < k, mask))
            metrics.append(Metric(f"{d}_r@{k}", recalls[-1]))
        metrics.append(Metric(f"{d}_mrr", _mean_of(1.0 / (rank + 1.0), mask)))
    metrics.append(Metric("mean_recall", lambda w: np.mean([f(w) for f in recalls], axis=0)))
    zs = [r.stats.get("zero_shot_correct") for r in records.records]
    if any(z is not None for z in zs):
        mask = np.array([z is not None for z in zs])
        metrics.append(Metric("zero_shot_accuracy", _mean_of(np.array([z or 0.0 for z in zs]), mask)))
    return metrics


def preference_metrics(records: RecordSet) -> list[Metric]:
    """Preference accuracy (chosen reply rewarded higher), mean reward margin and loss per pair."""
    out = []
    for name, better in (("accuracy", True), ("reward_margin", True), ("loss", False)):
        values = [r.stats.get(name) for r in records.records]
        if all(v is not None for v in values):
            out.append(Metric(name, _mean_of(np.array(values, dtype=np.float64)), higher_is_better=better))
    return out


SUITES: dict[str, Callable[[RecordSet], list[Metric]]] = {
    "classification": classification_metrics,
    "generation": generation_metrics,
    "language_model": token_loss_metrics,
    "retrieval": retrieval_metrics,
    "preference": preference_metrics,
}


def metrics_for(records: RecordSet) -> list[Metric]:
    """The metrics a record set supports (by its kind)."""
    return SUITES[records.kind](records)
