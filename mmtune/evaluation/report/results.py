"""The report's judgement sections: the test table with intervals, the baseline comparison, the
subgroup audit and the retention (forgetting) table, from `metrics.json` (`test`, `evaluate`,
`retention`) and `evaluation/comparison.json`."""

from __future__ import annotations

from typing import Optional

from mmtune.evaluation.report import plots
from mmtune.evaluation.report.collect import RunData
from mmtune.evaluation.report.html import Raw, Section, badge, facts, figure, fmt, interval, note, signed, table
from mmtune.evaluation.report.summary import overall

LOWER_IS_BETTER = ("loss", "perplexity", "ece")


def _conf(entry: dict) -> float:
    return float((entry.get("bootstrap") or {}).get("confidence") or 0.95)


def _per_class(values: dict) -> tuple[list[str], list[str]]:
    """The `metric/class` names of a metric dict as (metrics, classes), in first-seen order."""
    metrics, classes = {}, {}
    for key in values:
        if key.count("/") == 1:
            m, c = key.split("/")
            metrics[m], classes[c] = None, None
    return list(metrics), list(classes)


def test_section(run: RunData) -> Section:
    section = Section("test", "Test results")
    test = run.test
    intervals = test.get("intervals") or {}
    if not test:
        section.missing = "test results (run `mmtune test --ckpt_path best` or `mmtune evaluate`)"
        return section
    conf = _conf(test)
    parts = [facts([("samples", fmt(test.get("samples"))), ("checkpoint", test.get("ckpt_path")),
                    ("intervals", f"{conf:.0%} bootstrap over test samples, {(test.get('bootstrap') or {}).get('resamples')} "
                                  f"resamples, seed {(test.get('bootstrap') or {}).get('seed')}" if intervals else None),
                    ("wall time", f"{test['wall_time_s']:.1f} s" if isinstance(test.get("wall_time_s"), (int, float))
                     else None)])]
    if intervals:
        rows = [[name, fmt(iv.get("value")), fmt(iv.get("ci_low")), fmt(iv.get("ci_high"))]
                for name, iv in overall(intervals).items()]
        main = "<h3>Overall</h3>" + table(["metric", "value", f"{conf:.0%} CI low", f"{conf:.0%} CI high"], rows,
                                          numeric=[1, 2, 3])
        metrics, classes = _per_class(intervals)
        if classes:
            header = ["class", *metrics]
            body = [[c, *(_value_ci(intervals.get(f"{m}/{c}")) for m in metrics)] for c in classes]
            main = (f'<div class="side"><div>{main}</div><div><h3>Per class ({conf:.0%} CI in brackets)</h3>'
                    f"{table(header, body, numeric=range(1, len(header)))}</div></div>")
        parts.append(main)
    else:
        metrics = {k.removeprefix("test/"): v for k, v in (test.get("metrics") or {}).items()}
        parts.append(note("No bootstrap intervals were recorded (fewer than two test samples, or a run from before "
                          "intervals): the values alone.", "warn"))
        parts.append(table(["metric", "value"], [[k, fmt(v)] for k, v in metrics.items()], numeric=[1]))
    section.body = "".join(parts)
    return section


def _value_ci(iv: Optional[dict]) -> str:
    if not iv:
        return "–"
    value = fmt(iv.get("value"), 3)
    return value if iv.get("ci_low") is None else f"{value} {interval(iv.get('ci_low'), iv.get('ci_high'), 3)}"


def _tone(verdict: Optional[str]) -> str:
    return {"better": "good", "worse": "bad"}.get(verdict or "", "neutral")


def comparison_section(run: RunData) -> Section:
    section = Section("comparison", "Tuned against baseline")
    entry = run.comparison or {}
    comparison = entry.get("comparison") or {}
    if not comparison:
        section.missing = ("a baseline comparison (run `mmtune evaluate --ckpt_path best --baseline B`, B: another "
                           "checkpoint, an export, or `base` for LLMs, VLMs and CLIP)")
        return section
    conf = _conf(entry)
    bootstrap = entry.get("bootstrap") or {}
    parts = [facts([("baseline", entry.get("baseline")), ("tuned", entry.get("tuned")), ("samples", fmt(entry.get("samples"))),
                    ("interval", f"{conf:.0%} paired bootstrap of the difference, {bootstrap.get('resamples')} resamples, "
                                 f"seed {bootstrap.get('seed')}")])]

    def rows(values: dict) -> list[list]:
        return [[name, fmt(c.get("baseline")), fmt(c.get("tuned")), signed(c.get("difference")),
                 interval(c.get("ci_low"), c.get("ci_high"), sign=True),
                 "higher" if c.get("higher_is_better", True) else "lower", Raw(badge(c.get("verdict")))]
                for name, c in values.items()]

    header = ["metric", "baseline", "tuned", "difference", f"{conf:.0%} CI of difference", "better is", "verdict"]
    main = overall(comparison)
    parts.append(table(header, rows(main), numeric=[1, 2, 3, 4]))
    plotted = [(n, c.get("difference"), c.get("ci_low"), c.get("ci_high"), _tone(c.get("verdict")))
               for n, c in main.items() if c.get("difference") is not None]
    if plotted:
        parts.append(figure(plots.dots(plotted, "tuned − baseline (green: better, red: worse, blue: no clear difference)",
                                       0.0), "differences with intervals"))
    per_class = {k: v for k, v in comparison.items() if k.count("/") == 1}
    if per_class:
        parts.append(f"<details><summary>per-class metrics ({len(per_class)})</summary>"
                     f"{table(header, rows(per_class), numeric=[1, 2, 3, 4])}</details>")
    for column, audit in (entry.get("subgroups") or {}).items():
        parts.append(_subgroup_comparison(column, audit, conf))
    section.body = "".join(parts)
    return section


def _subgroup_comparison(column: str, audit: dict, conf: float) -> str:
    groups = audit.get("groups") or []
    names = list(overall({n: None for g in groups for n in (g.get("comparison") or {})}))[:3]
    header = ["group", "size", *[f"{n}: difference {conf:.0%} CI" for n in names]]
    body = []
    for g in groups:
        cells = []
        for n in names:
            c = (g.get("comparison") or {}).get(n) or {}
            cells.append(Raw(f"{signed(c.get('difference'), 3)} {interval(c.get('ci_low'), c.get('ci_high'), 3, True)} "
                             f"{badge(c.get('verdict')) if c.get('verdict') else ''}"))
        body.append([g.get("group"), Raw(f"{fmt(g.get('size'))} {badge('small') if g.get('small') else ''}"), *cells])
    return f"<h3>By {column}</h3>" + table(header, body, numeric=[1])


def subgroups_section(run: RunData) -> Section:
    section = Section("subgroups", "Subgroups")
    audits = run.test.get("subgroups") or {}
    if not audits:
        section.missing = "a subgroup audit (name manifest columns in `evaluation.subgroups`, e.g. [site, sex])"
        return section
    conf = _conf(run.test)
    parts = []
    for column, audit in audits.items():
        groups = audit.get("groups") or []
        names = list(overall({n: None for g in groups for n in (g.get("metrics") or {})}))[:4]
        header = ["group", "size", *[f"{n} ({conf:.0%} CI)" for n in names]]
        body = [[g.get("group"), Raw(f"{fmt(g.get('size'))} {badge('small') if g.get('small') else ''}"),
                 *(_value_ci((g.get("metrics") or {}).get(n)) for n in names)] for g in groups]
        parts.append(f"<h3>By {column} ({len(groups)} groups)</h3>")
        summary = []
        if names and names[0] in (audit.get("worst") or {}):
            w = audit["worst"][names[0]]
            summary.append(f"worst {names[0]}: {w.get('group')} at {fmt(w.get('value'), 3)}"
                           f"{' (a small group)' if w.get('small') else ''}; best-to-worst gap "
                           f"{fmt((audit.get('gap') or {}).get(names[0]), 3)}")
        if audit.get("min_group_size") is not None:
            summary.append(f"groups under {audit['min_group_size']} test samples are flagged small, never dropped")
        if summary:
            parts.append(note("; ".join(summary) + "."))
        parts.append(table(header, body, numeric=[1]))
        if names:
            parts.append(_group_plot(groups, names[0], run.test.get("intervals") or {}))
        odds = audit.get("equalized_odds") or {}
        if odds:
            parts.append(f"<details><summary>sensitivity, specificity and equalized-odds gaps per class</summary>"
                         + table(["class", "sensitivity gap", "specificity gap", "equalized-odds difference"],
                                 [[c, fmt(v.get("sensitivity_gap")), fmt(v.get("specificity_gap")),
                                   fmt(v.get("equalized_odds_difference"))] for c, v in odds.items()], numeric=[1, 2, 3])
                         + "</details>")
    section.body = "".join(parts)
    return section


def _group_plot(groups: list[dict], name: str, intervals: dict) -> str:
    rows = []
    for g in groups:
        iv = (g.get("metrics") or {}).get(name) or {}
        rows.append((f"{g.get('group')} (n={g.get('size')})", iv.get("value"), iv.get("ci_low"), iv.get("ci_high"),
                     "warn" if g.get("small") else ""))
    whole = (intervals.get(name) or {}).get("value")
    return figure(plots.dots(rows, f"{name} by group, with bootstrap intervals (dashed: the whole test set; orange: "
                                   "a small group)", whole), f"{name} by group")


def retention_section(run: RunData) -> Section:
    section = Section("retention", "Retention (forgetting checks)")
    entry = run.metrics.get("retention") or {}
    rows = entry.get("sets") or []
    if not rows:
        section.missing = "forgetting checks (add a `retention:` section with general sets to the config)"
        return section
    body = [[r.get("name"), r.get("kind"), r.get("metric"), fmt(r.get("before")), fmt(r.get("after")),
             signed(r.get("change")), _threshold(r), "higher" if r.get("higher_is_better", True) else "lower",
             Raw(badge(r.get("status")))] for r in rows]
    steps = (f"The untuned model at step {entry.get('before_step')} against the tuned one at step "
             f"{entry.get('after_step')} ({entry.get('weights', 'last')} weights).") if "before_step" in entry else ""
    section.body = (note(steps) if steps else "") + table(
        ["set", "kind", "metric", "before", "after", "change", "allowed drop", "better is", "status"], body,
        numeric=[3, 4, 5, 6])
    return section


def _threshold(row: dict) -> str:
    t = row.get("threshold")
    if t is None:
        return "–"
    return f"{t:.1%} of before" if row.get("relative") else fmt(t)
