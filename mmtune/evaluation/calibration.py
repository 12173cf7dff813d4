"""Calibration and operating points for classifiers: temperature scaling, calibration error, the
reliability diagram's bins, and decision thresholds chosen for a target (sensitivity, specificity,
best F1, Youden's J).

Pure functions on arrays: the classification task calls them on its validation logits at every
validation epoch (so the values fitted on a checkpoint's own weights travel with it), and the
evaluation room on test records. Targets are either class indices `[N]` (multi-class) or 0/1
`[N, K]` (one-hot or multi-label); probabilities are float64.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from mmtune.errors import ConfigError
from mmtune.evaluation import scores

log = logging.getLogger("mmtune")

ECE_BINS = scores.ECE_BINS
RULES = ("sensitivity", "specificity", "max_f1", "youden")
TARGETED = ("sensitivity", "specificity")
MIN_SAMPLES_PER_CLASS = 2  # below this many validation samples per class, temperature stays 1


# ---- temperature scaling and calibration error ------------------------------------------------------
def _one_hot(targets, k: int) -> np.ndarray:
    t = np.asarray(targets)
    if t.ndim == 1:
        out = np.zeros((len(t), k), dtype=bool)
        out[np.arange(len(t)), t.astype(int)] = True
        return out
    return t.astype(bool)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def fit_temperature(logits, targets, multi_label: bool, max_iter: int = 100) -> float:
    """The temperature T minimising the negative log-likelihood of `logits / T` (Guo et al. 2017).

    LBFGS on log T (so T stays positive), in float64. Multi-class: cross entropy; multi-label: binary
    cross entropy over every (sample, label). T > 1 softens an over-confident model; argmax (and
    ranking metrics) do not change.

    Args:
        logits: [N, K] validation logits.
        targets: [N] class indices or [N, K] 0/1 labels.
        multi_label: sigmoid outputs (BCE) instead of softmax (CE).
        max_iter: LBFGS iterations.

    Returns:
        T, clipped to [0.01, 100]; 1.0 when the fit does not converge to a finite value, and 1.0 with
        a warning when the logits separate the targets perfectly (every argmax right, or every
        multi-label sign right): the NLL then keeps falling as T -> 0, and a model that claims
        certainty from a small validation set without errors is worse than an uncalibrated one.
    """
    z_np = _numpy(logits)
    y_np = _one_hot(_numpy(targets), z_np.shape[1])
    separated = ((z_np > 0) == y_np).all() if multi_label else y_np[np.arange(len(z_np)), z_np.argmax(axis=1)].all()
    if separated:
        log.warning(f"[mmtune] calibration: the {len(z_np)} validation samples are separated without an error, so "
                    "no temperature fits (the likelihood grows as T -> 0); the temperature stays 1")
        return 1.0
    # Lightning calls this inside torch.inference_mode (validation epoch end): gradients need it off.
    with torch.inference_mode(False), torch.enable_grad():
        z = torch.tensor(z_np, dtype=torch.float64)
        if multi_label:
            y = torch.tensor(y_np, dtype=torch.float64)
            nll = lambda t: F.binary_cross_entropy_with_logits(z / t, y)  # noqa: E731
        else:
            y = torch.tensor(y_np.argmax(axis=1), dtype=torch.long)
            nll = lambda t: F.cross_entropy(z / t, y)  # noqa: E731
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nll(log_t.exp())
            loss.backward()
            return loss

        opt.step(closure)
        t = float(log_t.detach().exp())
    return min(max(t, 0.01), 100.0) if math.isfinite(t) else 1.0


def expected_calibration_error(probs, targets, multi_label: bool, bins: int = ECE_BINS) -> float:
    """The expected calibration error of probabilities: `mmtune.evaluation.scores`' definition (top-label
    for multi-class, every (sample, label) for multi-label; equal-width bins) at unit sample weights."""
    p = _numpy(probs)
    terms, decisions = scores.calibration_error_terms(p, _one_hot(targets, p.shape[1]), multi_label, bins)
    return float(scores.expected_calibration_error(terms, decisions)(np.ones((1, len(p))))[0])


def reliability_bins(probs, targets, multi_label: bool, bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram: for each equal-width confidence bin, its edges, how many decisions fall
    in it, their mean confidence and how often they were right (None for an empty bin).

    Multi-class: the predicted class's probability against being right; multi-label: every (sample,
    label) probability against the label. The count-weighted mean of |accuracy - confidence| is the ECE.
    """
    p = _numpy(probs)
    t = _one_hot(targets, p.shape[1])
    if multi_label:
        confidence, outcome = p.ravel(), t.ravel().astype(np.float64)
    else:
        confidence = p.max(axis=1)
        outcome = t[np.arange(len(p)), p.argmax(axis=1)].astype(np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append({"lower": b / bins, "upper": (b + 1) / bins, "count": n,
                    "confidence": float(confidence[inside].mean()) if n else None,
                    "accuracy": float(outcome[inside].mean()) if n else None})
    return out


# ---- operating points -------------------------------------------------------------------------------
@dataclass(frozen=True)
class OperatingPoint:
    """How decision thresholds are chosen on validation.

    Attributes:
        rule: `sensitivity` (the highest threshold whose sensitivity reaches `target`), `specificity`
            (the lowest threshold whose specificity reaches `target`), `max_f1`, or `youden`
            (max sensitivity + specificity - 1).
        target: the sensitivity or specificity to reach, in (0, 1].
        positive_class: a binary task's positive class (default: the second class, e.g. `pneumonia`
            of `[normal, pneumonia]`).
    """

    rule: str
    target: Optional[float] = None
    positive_class: Optional[str] = None

    def as_dict(self) -> dict:
        return asdict(self)


def parse_operating_point(value: Union[None, str, dict, OperatingPoint]) -> Optional[OperatingPoint]:
    """Reads the config's `operating_point`: `max_f1`, `youden`, `{sensitivity: 0.95}`,
    `{specificity: 0.9, positive: pneumonia}` or `{rule: youden, positive: pneumonia}`.

    Raises:
        ConfigError: an unknown rule or key, or a target outside (0, 1].
    """
    if value is None or isinstance(value, OperatingPoint):
        return value
    where = "operating_point"
    if isinstance(value, str):
        spec: dict = {"rule": value}
    elif isinstance(value, dict):
        spec = dict(value)
    else:
        raise ConfigError(f"{where}: expected a rule name or a mapping, got {value!r}")
    positive = spec.pop("positive", spec.pop("positive_class", None))
    if "rule" in spec:
        rule, target = spec.pop("rule"), spec.pop("target", None)
    else:
        named = [k for k in spec if k in RULES]
        if len(named) != 1:
            raise ConfigError(f"{where}: name one rule of {', '.join(RULES)}; got {sorted(spec) or 'none'}")
        rule = named[0]
        target = spec.pop(rule)
        if rule not in TARGETED and target in (True, None):
            target = None
    if spec:
        raise ConfigError(f"{where}: unknown key(s) {sorted(spec)}; known: a rule ({', '.join(RULES)}), rule, "
                          "target, positive")
    if rule not in RULES:
        raise ConfigError(f"{where}: unknown rule {rule!r}; known: {', '.join(RULES)}")
    if rule in TARGETED:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < float(target) <= 1:
            raise ConfigError(f"{where}.{rule}: the target must be a number in (0, 1], got {target!r}")
        target = float(target)
    elif target is not None:
        raise ConfigError(f"{where}: {rule} takes no target (got {target!r})")
    return OperatingPoint(rule, target, None if positive is None else str(positive))


@dataclass
class ThresholdChoice:
    """Per-class thresholds (decide `p >= threshold`) and what they reach on the data they were chosen on.

    Attributes:
        thresholds: [K] thresholds.
        sensitivity: [K] sensitivity at the threshold (NaN without positives).
        specificity: [K] specificity at the threshold (NaN without negatives).
        undefined: classes where the rule had no answer (no positives or no negatives for it): they
            keep the default threshold.
    """

    thresholds: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray
    undefined: list[int] = field(default_factory=list)


def _candidates(s: np.ndarray) -> np.ndarray:
    """Ascending thresholds that realise every distinct decision on scores `s`: below all, midway
    between neighbouring distinct scores, above all. Midpoints keep the decision the same when the
    probabilities are recomputed with float rounding (float32 on the device)."""
    u = np.unique(s)
    above = (u[-1] + 1.0) / 2 if u[-1] < 1.0 else float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    return np.concatenate([[u[0] / 2], (u[:-1] + u[1:]) / 2, [above]])


def _counts(s: np.ndarray, y: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, ...]:
    """True and false positives of `s >= t` for every candidate t, and the positive/negative totals."""
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tp = len(pos) - np.searchsorted(pos, cand, side="left")
    fp = len(neg) - np.searchsorted(neg, cand, side="left")
    return tp.astype(np.float64), fp.astype(np.float64), float(len(pos)), float(len(neg))


def _ratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1e-300), np.nan)


def choose_thresholds(scores_: np.ndarray, targets, rule: Union[str, dict, OperatingPoint],
                      default: Union[float, Sequence[float]] = 0.5) -> ThresholdChoice:
    """Per-class decision thresholds for an operating point, one-vs-rest on probabilities.

    Args:
        scores_: [N, K] probabilities (after temperature scaling, when it is used).
        targets: [N, K] 0/1 labels (or [N] class indices).
        rule: an `OperatingPoint` or its config form (`{sensitivity: 0.95}`, `max_f1`, ...).
        default: the threshold(s) kept for classes where the rule has no answer.

    Returns:
        The thresholds and the sensitivity and specificity they reach on this data; ties between
        thresholds of equal F1 or J go to the highest threshold (fewer false positives).
    """
    point = parse_operating_point(rule)
    s = _numpy(scores_)
    s = s.reshape(len(s), -1)
    y = _one_hot(targets, s.shape[1])
    k = s.shape[1]
    chosen = np.broadcast_to(np.asarray(default, dtype=np.float64), (k,)).copy()
    sens, spec, undefined = np.full(k, np.nan), np.full(k, np.nan), []
    eps = 1e-12  # sensitivity 19/20 must count as reaching 0.95
    for c in range(k):
        if not len(s):
            undefined.append(c)
            continue
        cand = _candidates(s[:, c])
        tp, fp, n_pos, n_neg = _counts(s[:, c], y[:, c], cand)
        c_sens, c_spec = _ratio(tp, n_pos), _ratio(n_neg - fp, n_neg)
        pick: Optional[int] = None
        if point.rule == "sensitivity" and n_pos:
            pick = int(np.flatnonzero(c_sens >= point.target - eps).max())
        elif point.rule == "specificity" and n_neg:
            pick = int(np.flatnonzero(c_spec >= point.target - eps).min())
        elif point.rule == "max_f1" and n_pos:
            f1 = _ratio(2 * tp, 2 * tp + fp + (n_pos - tp))
            pick = int(np.flatnonzero(f1 == np.nanmax(f1)).max())
        elif point.rule == "youden" and n_pos and n_neg:
            j = c_sens + c_spec - 1
            pick = int(np.flatnonzero(j == j.max()).max())
        if pick is None:
            undefined.append(c)
            at = s[:, c] >= chosen[c]
            pos, neg = y[:, c], ~y[:, c]
            sens[c] = at[pos].mean() if pos.any() else np.nan
            spec[c] = (~at[neg]).mean() if neg.any() else np.nan
            continue
        chosen[c], sens[c], spec[c] = cand[pick], c_sens[pick], c_spec[pick]
    return ThresholdChoice(chosen, sens, spec, undefined)


def positive_index(point: Optional[OperatingPoint], classes: Sequence[str], multi_label: bool) -> Optional[int]:
    """Which class a binary task's threshold decides; None for multi-label or without an operating point.

    A per-class threshold is a yes/no decision for one finding. Multi-label tasks make K such
    decisions and binary tasks one (on the positive class's probability). A multi-class task with
    more than two classes makes one choice among K: thresholds one-vs-rest would give zero or
    several labels per image, which is a multi-label model's job, and leaving argmax alone would
    report sensitivities the decisions do not have. So it is refused: frame the findings as
    multi-label (or each as binary) to choose operating points.

    Raises:
        ConfigError: an operating point for more than two exclusive classes, or an unknown
            `positive` class, or `positive` on a multi-label task.
    """
    if point is None:
        return None
    if multi_label:
        if point.positive_class is not None:
            raise ConfigError("operating_point.positive names a binary task's positive class; a multi-label "
                              "task gets a threshold per class")
        return None
    if len(classes) != 2:
        raise ConfigError(f"operating_point needs a binary or multi-label task; this one has {len(classes)} exclusive "
                          "classes (one-vs-rest thresholds would not give one class per image): make the findings "
                          "multi-label (data.multi_label: true) or drop operating_point")
    if point.positive_class is None:
        return 1
    if point.positive_class not in classes:
        raise ConfigError(f"operating_point.positive: {point.positive_class!r} is not a class; classes: {list(classes)}")
    return list(classes).index(point.positive_class)


@dataclass
class Calibration:
    """What was fitted on validation for one set of weights (saved in the checkpoint, written to
    metrics.json as `calibration`)."""

    temperature: float
    ece_before: Optional[float]
    ece_after: Optional[float]
    thresholds: dict[str, float]
    val_sensitivity: dict[str, Optional[float]]
    val_specificity: dict[str, Optional[float]]
    operating_point: Optional[dict]
    samples: int
    fitted_on: str = "val"

    def as_dict(self) -> dict:
        return asdict(self)


def _finite(x: float) -> Optional[float]:
    return float(x) if np.isfinite(x) else None


def calibrate(logits, targets, classes: Sequence[str], multi_label: bool, temperature_scaling: bool,
              point: Optional[OperatingPoint], default_thresholds: Sequence[float]) -> Calibration:
    """Fits the temperature (if asked) and chooses thresholds (for an operating point) on validation.

    Args:
        logits: [N, K] validation logits.
        targets: [N] class indices or [N, K] 0/1 labels.
        classes: the class names.
        multi_label: sigmoid outputs with a threshold per class.
        temperature_scaling: fit T; otherwise T = 1.
        point: the operating point, or None (multi-label: the configured thresholds are kept).
        default_thresholds: [K] configured thresholds (kept where the rule has no answer).

    Returns:
        The temperature, ECE before and after it, and the thresholds with their validation
        sensitivity and specificity (for the decided classes: every class of a multi-label task,
        the positive class of a binary one).
    """
    z = _numpy(logits).reshape(-1, len(classes))
    y = _one_hot(targets, len(classes))
    n, k = z.shape
    t = 1.0
    if temperature_scaling:
        if n < MIN_SAMPLES_PER_CLASS * k:
            log.warning(f"[mmtune] calibration: {n} validation samples for {k} classes (fewer than "
                        f"{MIN_SAMPLES_PER_CLASS} per class); the temperature stays 1")
        else:
            t = fit_temperature(z, y, multi_label)
    before = scores.probabilities(z, multi_label) if n else z
    after = scores.probabilities(z, multi_label, t) if n else z
    ece = (lambda p: _finite(expected_calibration_error(p, y, multi_label))) if n else (lambda p: None)
    positive = positive_index(point, classes, multi_label)
    decided = list(range(k)) if multi_label else ([positive] if positive is not None else [])
    defaults = np.asarray(default_thresholds, dtype=np.float64)[decided]
    if decided and point is not None:
        choice = choose_thresholds(after[:, decided], y[:, decided], point, defaults)
        for c in choice.undefined:
            log.warning(f"[mmtune] operating point {point.rule}: class {classes[decided[c]]!r} has no positive or "
                        f"no negative validation sample; its threshold stays {defaults[c]:g}")
    elif decided:  # multi-label without an operating point: report the configured thresholds
        at = after[:, decided] >= defaults
        choice = ThresholdChoice(defaults, _ratio((at & y).sum(0), y.sum(0)), _ratio((~at & ~y).sum(0), (~y).sum(0)))
    else:
        choice = ThresholdChoice(np.zeros(0), np.zeros(0), np.zeros(0))
    names = [classes[c] for c in decided]
    return Calibration(
        temperature=t, ece_before=ece(before), ece_after=ece(after),
        thresholds={c: float(v) for c, v in zip(names, choice.thresholds)},
        val_sensitivity={c: _finite(v) for c, v in zip(names, choice.sensitivity)},
        val_specificity={c: _finite(v) for c, v in zip(names, choice.specificity)},
        operating_point=point.as_dict() if point is not None else None, samples=n)


def calibration_entry(records) -> Optional[dict]:
    """The `calibration` entry of metrics.json after a test: what was fitted on validation (carried in
    the records' `info.calibration`), with the test set's calibration error and reliability bins
    before and after the temperature. None when the task fitted nothing.

    Args:
        records: a classification `RecordSet` (scores are raw logits, `info.temperature` the temperature).
    """
    fitted = records.info.get("calibration")
    if records.kind != "classification" or not fitted:
        return None
    a = scores.classification_arrays(records)
    multi, t = bool(records.info.get("multi_label")), float(records.info.get("temperature") or 1.0)
    before, after = scores.probabilities(a["logits"], multi), scores.probabilities(a["logits"], multi, t)
    test = {"samples": len(records),
            "ece_before": _finite(expected_calibration_error(before, a["target"], multi)),
            "ece_after": _finite(expected_calibration_error(after, a["target"], multi)),
            "reliability_before": reliability_bins(before, a["target"], multi),
            "reliability_after": reliability_bins(after, a["target"], multi)}
    entry = {**fitted, "test": test}
    if records.info.get("ckpt_path"):
        entry["checkpoint"] = records.info["ckpt_path"]
    return entry
