"""The retention table: before, after, change and the threshold's verdict, per set and metric.

A row's `change` is after - before in the metric's units; its `drop` is the loss of capability in the
metric's own direction (a rise of a loss, a fall of an accuracy), so one threshold reads the same way
for every kind. `metrics.json`'s `retention` entry holds the rows as written here.
"""

from __future__ import annotations

import math
from typing import Optional

from mmtune.errors import ConfigError
from mmtune.evaluation.retention.spec import RetentionSet

OK, WARN, FAIL = "ok", "warn", "fail"


def drop_of(before: float, after: float, higher_is_better: bool) -> float:
    """The loss of capability from before to after (positive: worse); NaN after counts as infinitely worse."""
    if math.isnan(after):
        return math.inf
    return before - after if higher_is_better else after - before


def checked_metrics(rset: RetentionSet, available: list[str], default: Optional[tuple[str, ...]]) -> list[str]:
    """The metrics the threshold applies to: the set's `metric`, else the kind's default ones present.

    Raises:
        ConfigError: a configured metric the set does not report (the names it reports are listed).
    """
    wanted = rset.metrics
    if wanted is None:
        return [m for m in (default or available) if m in available]
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ConfigError(f"retention set {rset.name!r}: metric {unknown[0]!r} is not reported by kind {rset.kind}; "
                          f"it reports {available}")
    return wanted


def retention_rows(rset: RetentionSet, before: dict[str, float], after: dict[str, float],
                   higher: dict[str, bool], checked: list[str]) -> list[dict]:
    """One row per metric of the set (metrics.json's `retention.sets` entries).

    Args:
        rset: the set (its name, kind, threshold and action).
        before: the untuned model's scores.
        after: the tuned model's scores.
        higher: whether a higher value is better, per metric.
        checked: the metrics the threshold applies to; the others are reported with threshold None.
    """
    rows = []
    for metric in before:
        b, a = float(before[metric]), float(after.get(metric, math.nan))
        drop = drop_of(b, a, higher[metric])
        threshold = rset.max_drop if metric in checked else None
        status = OK
        if threshold is not None:
            allowed = threshold * abs(b) if rset.relative else threshold
            if drop > allowed:
                status = FAIL if rset.action == "fail" else WARN
        rows.append({"name": rset.name, "kind": rset.kind, "metric": metric, "before": b, "after": a,
                     "change": a - b, "drop": drop, "higher_is_better": higher[metric], "threshold": threshold,
                     "relative": rset.relative if threshold is not None else None, "status": status})
    return rows


def describe(row: dict) -> str:
    """One line on a row that tripped its threshold."""
    limit = f"{row['threshold']:.2%} of before" if row["relative"] else f"{row['threshold']:g}"
    verb = "fell" if row["higher_is_better"] else "rose"
    return (f"{row['name']} ({row['kind']}) {row['metric']} {verb} from {row['before']:.4g} to {row['after']:.4g} "
            f"(drop {row['drop']:.4g}, allowed {limit})")


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table for the terminal."""
    header = ("set", "kind", "metric", "before", "after", "change", "threshold", "status")
    body = []
    for r in rows:
        if r["threshold"] is None:
            limit = "-"
        else:
            limit = f"{r['threshold']:.1%} rel" if r["relative"] else f"{r['threshold']:g}"
        arrow = "" if r["higher_is_better"] else " (lower is better)"
        body.append((r["name"], r["kind"], r["metric"] + arrow, f"{r['before']:.4f}", f"{r['after']:.4f}",
                     f"{r['change']:+.4f}", limit, r["status"].upper() if r["status"] != OK else OK))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    return "\n".join(lines)
