"""Subgroup audits: every test metric group by group of a metadata column (sex, age band, site,
scanner, production line), the worst group and the spread between best and worst, and for
classification the sensitivity, specificity and equalized-odds gaps of each class.

It reads only the records: `SampleRecord.meta` carries the manifest's columns (classification) or
the pair row's columns (retrieval). Fairlearn's `MetricFrame` slices the records by a column and
computes the per-group rates; each group's task metrics and intervals are the same weighted-sample
definitions as the whole test set's (`mmtune.evaluation.scores`, `mmtune.evaluation.bootstrap`), on
that group's records. Groups below the minimum size are kept and flagged `small`: a small group is
exactly where a model can fail unseen, so dropping it would hide what the audit is for. Records
without a value for the column form the group `(missing)`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import numpy as np

from mmtune.errors import ConfigError
from mmtune.evaluation.bootstrap import BootstrapSpec, Comparison, Interval, align, compare, intervals
from mmtune.evaluation.run import _fmt, _table
from mmtune.evaluation.scores import Metric, classification_arrays, metrics_for
from mmtune.evaluation.spec import EvaluationSpec
from mmtune.metrics.records import RecordSet

MISSING = "(missing)"  # the group of records with no value (None or "") for the column


def _fairlearn():
    """`fairlearn.metrics`, imported when an audit is asked for (it is the optional `eval` extra)."""
    try:
        import fairlearn.metrics as fm
    except ImportError:
        raise ConfigError("evaluation.subgroups needs Fairlearn, which is not installed: "
                          "pip install 'mmtune[eval]'") from None
    return fm


def group_key(value: Any) -> str:
    """A record's group for a column: its value as text; None, NaN and blanks are `(missing)`."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    return str(value).strip() or MISSING


def group_keys(records: RecordSet, column: str) -> list[str]:
    """Every record's group for `column`, in the records' order.

    Raises:
        ConfigError: no record has the column (the message lists the columns that exist).
    """
    columns = records.meta_columns()
    if column not in columns:
        raise ConfigError(f"evaluation.subgroups: the test data has no column {column!r}; its columns are: "
                          f"{', '.join(columns) or '(none)'}")
    return [group_key(r.meta.get(column)) for r in records.records]


def _group_order(name: str) -> tuple:
    return (name == MISSING, name)  # alphabetical, `(missing)` last


def slices(keys: list[str]) -> dict[str, np.ndarray]:
    """Group -> positions of its records, sliced by Fairlearn's `MetricFrame` (sensitive feature: the
    column), in alphabetical order with `(missing)` last."""
    fm = _fairlearn()
    positions = np.arange(len(keys))
    frame = fm.MetricFrame(metrics={"rows": lambda rows, _: tuple(int(i) for i in rows)}, y_true=positions,
                           y_pred=positions, sensitive_features=np.asarray(keys, dtype=object))
    rows = frame.by_group["rows"]
    return {str(g): np.asarray(rows[g], dtype=int) for g in sorted(rows.index, key=lambda g: _group_order(str(g)))}


def subset(records: RecordSet, positions: np.ndarray) -> RecordSet:
    """The records at `positions`, with the set's task facts."""
    return RecordSet(records.kind, [records.records[i] for i in positions], records.info)


def _value(x: float) -> Optional[float]:
    return float(x) if np.isfinite(x) else None


def group_intervals(records: RecordSet, spec: BootstrapSpec) -> tuple[dict[str, Interval], list[Metric]]:
    """Every metric of one group with its interval; a one-sample group gets its values without an
    interval (a bootstrap needs two samples)."""
    metrics = metrics_for(records)
    if len(records) >= 2:
        return intervals(records, spec, metrics), metrics
    ones = np.ones((1, len(records)))
    return {m.name: Interval(_value(m.fn(ones)[0]), None, None) for m in metrics}, metrics


def _spread(values: list[Optional[float]]) -> Optional[float]:
    """Best minus worst over the groups where a value is defined; None below two such groups (one
    group's value shows no gap, it shows nothing about one)."""
    defined = [v for v in values if v is not None and math.isfinite(v)]
    return float(max(defined) - min(defined)) if len(defined) >= 2 else None


def worst_and_gap(groups: list[dict], better: dict[str, bool]) -> tuple[dict, dict]:
    """Per metric: the worst group by the metric's direction (with its value, and whether it is a
    small group) and the gap between the best and the worst group."""
    worst, gap = {}, {}
    for name, higher in better.items():
        have = [(g, g["metrics"][name]["value"]) for g in groups
                if (g["metrics"].get(name) or {}).get("value") is not None]
        gap[name] = _spread([v for _, v in have])
        if have:
            g, v = (min if higher else max)(have, key=lambda item: item[1])
            worst[name] = {"group": g["group"], "value": v, "small": g["small"]}
    return worst, gap


def equalized_odds(records: RecordSet, keys: list[str]) -> dict[str, dict]:
    """Per class (one-vs-rest; for a binary task both classes): the sensitivity gap and specificity
    gap across groups and the equalized-odds difference (the larger of the true- and false-positive
    rate gaps), from the records' decisions (at the operating point's thresholds when one was chosen)."""
    fm = _fairlearn()
    arrays = classification_arrays(records)
    features = np.asarray(keys, dtype=object)
    out = {}
    for c, name in enumerate(records.info.get("classes") or []):
        y_true, y_pred = arrays["target"][:, c].astype(int), arrays["predicted"][:, c].astype(int)
        frame = fm.MetricFrame(
            metrics={"sensitivity": partial(fm.true_positive_rate, pos_label=1),
                     "specificity": partial(fm.true_negative_rate, pos_label=1),
                     "positives": lambda t, _: int(np.sum(t)), "negatives": lambda t, _: int(len(t) - np.sum(t))},
            y_true=y_true, y_pred=y_pred, sensitive_features=features)
        by = frame.by_group
        # Fairlearn's rates are 0 for a group with no positives (or no negatives): sklearn's normalised
        # confusion matrix turns 0/0 into 0, so a group without a single case of the class would look
        # as if the model missed them all. Such rates are undefined here and left out of the gaps.
        sensitivity = [float(v) if p > 0 else None for v, p in zip(by["sensitivity"], by["positives"])]
        specificity = [float(v) if n > 0 else None for v, n in zip(by["specificity"], by["negatives"])]
        sens_gap, spec_gap = _spread(sensitivity), _spread(specificity)
        if None not in sensitivity and None not in specificity and len(sensitivity) >= 2:
            eod = float(fm.equalized_odds_difference(y_true, y_pred, sensitive_features=features))
        else:
            # By hand for the reason above: the FPR gap is the specificity gap (FPR = 1 - specificity),
            # over the groups where each rate is defined.
            defined = [g for g in (sens_gap, spec_gap) if g is not None]
            eod = max(defined) if defined else None
        out[name] = {"sensitivity_gap": sens_gap, "specificity_gap": spec_gap, "equalized_odds_difference": eod}
    return out


def audit_column(records: RecordSet, column: str, min_group_size: int,
                 spec: BootstrapSpec = BootstrapSpec()) -> dict:
    """The audit of one column: per group its size, `small` flag and every metric with its interval;
    the worst group and the gap per metric; the equalized-odds gaps per class (classification)."""
    keys = group_keys(records, column)
    groups, better = [], {}
    for group, positions in slices(keys).items():
        values, metrics = group_intervals(subset(records, positions), spec)
        better.update({m.name: m.higher_is_better for m in metrics if m.name not in better})
        groups.append({"group": group, "size": int(len(positions)), "small": bool(len(positions) < min_group_size),
                       "metrics": {name: iv.as_dict() for name, iv in values.items()}})
    worst, gap = worst_and_gap(groups, better)
    entry = {"groups": groups, "worst": worst, "gap": gap, "min_group_size": int(min_group_size)}
    if records.kind == "classification":
        entry["equalized_odds"] = equalized_odds(records, keys)
    return entry


def audit(records: RecordSet, spec: EvaluationSpec) -> dict[str, dict]:
    """`metrics.json` `test.subgroups`: one audit per column of `spec.subgroups`."""
    _fairlearn()  # a clear error before any work when the extra is missing
    return {column: audit_column(records, column, spec.min_group_size, spec.bootstrap) for column in spec.subgroups}


def _values_only(tuned: RecordSet, baseline: RecordSet) -> dict[str, Comparison]:
    """A one-sample group's comparison: both values and the difference, without an interval."""
    ones = np.ones((1, len(tuned)))
    mb = {m.name: m for m in metrics_for(baseline)}
    out = {}
    for m in metrics_for(tuned):
        if m.name in mb:
            t, b = m.fn(ones)[0], mb[m.name].fn(ones)[0]
            out[m.name] = Comparison(_value(b), _value(t), _value(t - b), None, None, m.higher_is_better)
    return out


def compare_subgroups(tuned: RecordSet, baseline: RecordSet, spec: EvaluationSpec) -> dict[str, dict]:
    """`metrics.json` `evaluate.subgroups`: per column and group, tuned against baseline on that
    group's samples (paired bootstrap on the group's records of both models)."""
    _fairlearn()
    baseline = align(tuned, baseline)
    out = {}
    for column in spec.subgroups:
        groups = []
        for group, positions in slices(group_keys(tuned, column)).items():
            t, b = subset(tuned, positions), subset(baseline, positions)
            result = compare(t, b, spec.bootstrap) if len(positions) >= 2 else _values_only(t, b)
            groups.append({"group": group, "size": int(len(positions)),
                           "small": bool(len(positions) < spec.min_group_size),
                           "comparison": {name: c.as_dict() for name, c in result.items()}})
        out[column] = {"groups": groups, "min_group_size": int(spec.min_group_size)}
    return out


HEADLINE = ("accuracy", "f1_macro", "auroc_macro", "mean_recall")  # shown first where a task has them


def subgroup_table(column: str, entry: dict, limit: int = 3) -> str:
    """A compact terminal view of one column's audit: group, size, flag and a few headline metrics,
    then the worst group and gap of the first one (and the largest equalized-odds difference)."""
    groups = entry.get("groups") or []
    present = list(dict.fromkeys(n for g in groups for n in g["metrics"] if "/" not in n))
    names = [n for n in HEADLINE if n in present]
    names = (names + [n for n in present if n not in names])[:limit]
    rows = [(g["group"], str(g["size"]), "small" if g["small"] else "",
             *(_fmt((g["metrics"].get(n) or {}).get("value")) for n in names)) for g in groups]
    lines = [f"[mmtune] subgroups by {column!r} ({len(groups)} groups; flagged: fewer than "
             f"{entry.get('min_group_size')} samples):", _table(("group", "size", "flag", *names), rows)]
    if names and names[0] in (entry.get("worst") or {}):
        worst = entry["worst"][names[0]]
        lines.append(f"worst {names[0]}: {worst['group']} ({_fmt(worst['value'])}"
                     f"{', small group' if worst.get('small') else ''}); gap {_fmt(entry['gap'].get(names[0]))}")
    odds = {c: v["equalized_odds_difference"] for c, v in (entry.get("equalized_odds") or {}).items()
            if v.get("equalized_odds_difference") is not None}
    if odds:
        top = max(odds, key=odds.get)
        lines.append(f"largest equalized-odds difference: {top} {_fmt(odds[top])}")
    return "\n".join(lines)

