"""Bootstrap confidence intervals for one model, and paired intervals for a baseline against a tuned model.

A resample is a vector of counts over the test samples (multinomial: N draws with replacement), and
every metric is a function of such weights (`mmtune.evaluation.scores`), so an interval costs one
metric evaluation per resample, never a model call. The paired bootstrap applies the same resample to
both models, which is what makes "tuned minus baseline" tight when both err on the same hard samples.
Resamples come from a seeded generator in fixed-size chunks: the same seed, records and resample count
give the same interval on any machine.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from mmtune.errors import DataError
from mmtune.evaluation.scores import Metric, metrics_for
from mmtune.metrics.records import RecordSet

CHUNK = 100  # resamples evaluated at once: bounds memory at CHUNK x N weights
LOSS_METRICS = ("loss", "perplexity")  # per-token metrics: comparable only on the same tokens

log = logging.getLogger("mmtune")


@dataclass
class BootstrapSpec:
    """How intervals are computed.

    Args:
        resamples: bootstrap resamples (1,000 by default, as the field reports).
        confidence: interval coverage (0.95: the 2.5th and 97.5th percentiles).
        seed: generator seed; the interval is exact to recompute from the saved records.
    """

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


def resample_weights(n: int, spec: BootstrapSpec, strata: Optional[Sequence] = None) -> Iterator[np.ndarray]:
    """Chunks of [b, n] resample counts. With `strata` (one key per sample), each stratum is resampled
    within itself, so e.g. image->text and text->image queries keep their own sizes."""
    if n < 2:
        raise DataError(f"a bootstrap needs at least 2 test samples; the test set has {n}")
    rng = np.random.default_rng(spec.seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(np.asarray(strata) == s) for s in dict.fromkeys(strata)]
    done = 0
    while done < spec.resamples:
        b = min(CHUNK, spec.resamples - done)
        w = np.zeros((b, n))
        for idx in groups:
            w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=b)
        done += b
        yield w


def _strata(records: RecordSet) -> Optional[list]:
    if records.kind == "retrieval":
        return [str(r.meta.get("direction")) for r in records.records]
    return None


def _percentiles(values: np.ndarray, confidence: float) -> tuple[Optional[float], Optional[float]]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return None, None
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def _value(x: float) -> Optional[float]:
    return float(x) if np.isfinite(x) else None


@dataclass
class Interval:
    """A metric's value on the test set and its bootstrap interval."""

    value: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]

    def as_dict(self) -> dict:
        return asdict(self)


def intervals(records: RecordSet, spec: BootstrapSpec = BootstrapSpec(),
              metrics: Optional[list[Metric]] = None) -> dict[str, Interval]:
    """Every metric of a record set with its bootstrap interval."""
    metrics = metrics if metrics is not None else metrics_for(records)
    n = len(records)
    ones = np.ones((1, n))
    draws: dict[str, list[np.ndarray]] = {m.name: [] for m in metrics}
    for w in resample_weights(n, spec, _strata(records)):
        for m in metrics:
            draws[m.name].append(m.fn(w))
    out = {}
    for m in metrics:
        lo, hi = _percentiles(np.concatenate(draws[m.name]), spec.confidence)
        out[m.name] = Interval(_value(m.fn(ones)[0]), lo, hi)
    return out


@dataclass
class Comparison:
    """Baseline against tuned on one metric: both values, the difference (tuned - baseline) and its
    paired bootstrap interval; `better` says whether the interval excludes 0 in the good direction."""

    baseline: Optional[float]
    tuned: Optional[float]
    difference: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        """`better`, `worse` or `no clear difference` at the interval's confidence."""
        if self.ci_low is None or self.ci_high is None:
            return "no clear difference"
        if self.ci_low > 0 or self.ci_high < 0:
            improved = (self.ci_low > 0) == self.higher_is_better
            return "better" if improved else "worse"
        return "no clear difference"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def align(tuned: RecordSet, baseline: RecordSet) -> RecordSet:
    """The baseline's records in the tuned records' order; both must cover the same samples.

    Raises:
        DataError: different kinds, class lists or samples (the models cannot be compared).
    """
    if tuned.kind != baseline.kind:
        raise DataError(f"cannot compare a {baseline.kind} baseline with a {tuned.kind} model")
    if tuned.kind == "classification":
        a, b = tuned.info.get("classes"), baseline.info.get("classes")
        if a != b:
            raise DataError(f"the baseline predicts other classes ({b}) than the tuned model ({a}): they cannot "
                            "be compared on one test set")
    a, b = tuned.info.get("vocabulary"), baseline.info.get("vocabulary")
    if a and b and a != b:
        raise DataError("the baseline's tokenizer has another vocabulary than the tuned model's: their per-token "
                        "losses count different tokens and cannot be compared (use a baseline with the same tokenizer)")
    by_id = {r.id: r for r in baseline.records}
    missing = [r.id for r in tuned.records if r.id not in by_id]
    if missing or len(by_id) != len(tuned.records):
        raise DataError(f"the baseline was scored on other samples than the tuned model ({len(baseline)} vs "
                        f"{len(tuned)} records; e.g. {missing[:1] or sorted(set(by_id) - set(tuned.ids))[:1]} "
                        "is in one only): score both on the same test set")
    aligned = RecordSet(baseline.kind, [by_id[i] for i in tuned.ids], baseline.info)
    if tuned.kind == "language_model":
        other = token_count_mismatch(tuned, aligned)
        if other:
            raise DataError(f"the baseline supervises other tokens than the tuned model ({other}): another chat "
                            "template or tokenizer? Per-token losses compare only on the same tokens")
    return aligned


def token_count_mismatch(tuned: RecordSet, baseline: RecordSet) -> Optional[str]:
    """The first sample (in the tuned order, both aligned) whose supervised token counts differ, as
    text; None when every sample has the same count or the records carry none."""
    for t, b in zip(tuned.records, baseline.records):
        if "tokens" in t.stats and "tokens" in b.stats and t.stats["tokens"] != b.stats["tokens"]:
            return f"sample {t.id}: {b.stats['tokens']:g} tokens against {t.stats['tokens']:g}"
    return None


def compare(tuned: RecordSet, baseline: RecordSet, spec: BootstrapSpec = BootstrapSpec()) -> dict[str, Comparison]:
    """Paired bootstrap of every metric both record sets support: one resample, both models."""
    baseline = align(tuned, baseline)
    mt = {m.name: m for m in metrics_for(tuned)}
    mb = {m.name: m for m in metrics_for(baseline)}
    names = [n for n in mt if n in mb]
    other_tokens = token_count_mismatch(tuned, baseline)
    if other_tokens and any(n in LOSS_METRICS for n in names):
        # generated text still compares (the text metrics), the per-token loss does not
        log.warning("the baseline supervises other tokens than the tuned model (%s): loss and perplexity are "
                    "left out of the comparison", other_tokens)
        names = [n for n in names if n not in LOSS_METRICS]
    n = len(tuned)
    diffs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for w in resample_weights(n, spec, _strata(tuned)):
        for name in names:
            diffs[name].append(mt[name].fn(w) - mb[name].fn(w))
    ones = np.ones((1, n))
    out = {}
    for name in names:
        t, b = mt[name].fn(ones)[0], mb[name].fn(ones)[0]
        lo, hi = _percentiles(np.concatenate(diffs[name]), spec.confidence)
        out[name] = Comparison(_value(b), _value(t), _value(t - b), lo, hi, mt[name].higher_is_better)
    return out
