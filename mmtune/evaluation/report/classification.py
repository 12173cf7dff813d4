"""The report's classification sections: confusion matrix, ROC and precision-recall curves per class,
the reliability diagram (before and after temperature scaling) and a gallery of the worst errors,
from the test records (`records/test.jsonl`), the confusion matrix files and `metrics.json`'s
`calibration` entry."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from mmtune.evaluation.calibration import reliability_bins
from mmtune.evaluation.report import plots
from mmtune.evaluation.report.collect import RunData
from mmtune.evaluation.report.html import Section, esc, facts, figure, fmt, heat_table, note, table
from mmtune.evaluation.scores import classification_arrays, probabilities
from mmtune.metrics.ranking import class_log_odds, weighted_auroc, weighted_average_precision

GALLERY = 12  # worst errors shown


def _unavailable(section: Section, run: RunData, what: str) -> bool:
    """Marks a classification section that has no records to show (missing) or another task's
    records (not applicable); True when it has nothing to draw."""
    if run.records is None:
        section.missing = f"{what} (no test records: run `mmtune test`)"
    elif run.kind != "classification":
        section.not_applicable = f"{what} are drawn for classifiers; these are {run.kind} records"
    return section.absent


def _where(run: RunData) -> str:
    ckpt = run.test.get("ckpt_path") or (run.records.info.get("ckpt_path") if run.records else None)
    return "test split" + (f", checkpoint {Path(ckpt).name}" if ckpt else "")


def confusion_section(run: RunData) -> Section:
    section = Section("confusion", "Confusion matrix")
    m = run.confusion
    if m is None:
        if not _unavailable(section, run, "confusion matrices"):
            section.missing = "a confusion matrix"
        return section
    multi = m.columns == ["tn", "fp", "fn", "tp"]
    corner = "label" if multi else "true \\ predicted"
    counts = heat_table(m.rows, m.columns, m.counts, m.shares, corner, 0)
    shares = heat_table(m.rows, m.columns, m.shares, m.shares, corner, 2)
    what = ("one row per label: true negatives, false positives, false negatives, true positives; shares of the "
            "label's negatives (tn, fp) and positives (fn, tp)" if multi else
            "rows: true class, columns: predicted class; the right view divides each row by its true class's count")
    section.body = (note(f"{_where(run)} ({m.source}); {what}.") +
                    f'<div class="pair"><div><h3>Counts</h3>{counts}</div><div><h3>Row-normalised</h3>{shares}</div></div>')
    return section


def ranking_section(run: RunData) -> Section:
    section = Section("curves", "ROC and precision-recall")
    if _unavailable(section, run, "ROC and precision-recall curves"):
        return section
    a = classification_arrays(run.records)
    classes = list(run.records.info["classes"])
    multi = bool(run.records.info.get("multi_label"))
    odds = class_log_odds(a["logits"], multi)
    target = a["target"]
    auroc = {c: _finite(weighted_auroc(odds[:, i], target[:, i])[0]) for i, c in enumerate(classes)}
    ap = {c: _finite(weighted_average_precision(odds[:, i], target[:, i])[0]) for i, c in enumerate(classes)}
    # A binary task's two one-vs-rest curves are mirror images with equal AUROC: show the positive class.
    shown = [1] if len(classes) == 2 and not multi else list(range(min(len(classes), plots.MAX_CURVE_CLASSES)))
    parts = [note(f"{_where(run)}; one-vs-rest per class, ranked by float64 log-odds from the logits (no saturated "
                  "probabilities, no ties the model did not make).")]
    parts.append(figure(plots.roc_pr(odds, target, classes, shown, auroc, ap), "ROC and precision-recall curves"))
    if len(shown) < len(classes) and len(classes) > 2:
        parts.append(note(f"Curves of the first {len(shown)} of {len(classes)} classes; the table has all."))
    rows = [[c, fmt(int(target[:, i].sum())), fmt(auroc[c]), fmt(ap[c])] for i, c in enumerate(classes)]
    parts.append(table(["class", "positives", "AUROC", "average precision"], rows, numeric=[1, 2, 3]))
    section.body = "".join(parts)
    return section


def _finite(x: float) -> Optional[float]:
    return float(x) if np.isfinite(x) else None


def calibration_section(run: RunData) -> Section:
    section = Section("calibration", "Calibration")
    entry = run.metrics.get("calibration") or {}
    test = entry.get("test") or {}
    panels = []
    if test.get("reliability_before"):
        temperature = entry.get("temperature")
        panels.append(("before temperature scaling", test["reliability_before"], test.get("ece_before")))
        if temperature not in (None, 1, 1.0) and test.get("reliability_after"):
            panels.append((f"after temperature {temperature:.3g}", test["reliability_after"], test.get("ece_after")))
    elif run.records is not None and run.kind == "classification":
        a = classification_arrays(run.records)
        multi = bool(run.records.info.get("multi_label"))
        t = float(run.records.info.get("temperature") or 1.0)
        bins = reliability_bins(probabilities(a["logits"], multi), a["target"], multi)
        panels.append(("test set", bins, _ece(bins)))
        if t != 1.0:
            after = reliability_bins(probabilities(a["logits"], multi, t), a["target"], multi)
            panels.append((f"after temperature {t:.3g}", after, _ece(after)))
    if not panels:
        if not _unavailable(section, run, "reliability diagrams"):
            section.missing = "a reliability diagram"
        return section
    parts = []
    if entry:
        op = entry.get("operating_point") or {}
        parts.append(facts([
            ("temperature", f"{fmt(entry.get('temperature'), 3)} (fitted on the {entry.get('fitted_on', 'val')} split, "
                            f"{entry.get('samples')} samples)" if entry.get("temperature") is not None else None),
            ("validation ECE", f"{fmt(entry.get('ece_before'))} → {fmt(entry.get('ece_after'))}"),
            ("test ECE", f"{fmt(test.get('ece_before'))} → {fmt(test.get('ece_after'))}" if test else None),
            ("operating point", (f"{op.get('rule')}" + (f" {op.get('target')}" if op.get("target") is not None else "")
                                 + (f", positive class {op['positive_class']}" if op.get("positive_class") else ""))
             if op else None)]))
    else:
        parts.append(note("No temperature was fitted for this run (model.calibration: temperature fits one on "
                          "validation); the diagram shows the model's own probabilities."))
    parts.append(figure(plots.reliability(panels), "reliability diagram",
                        "Bars: how often the model was right in each confidence bin (top-label for multi-class, every "
                        "label for multi-label); red: the gap to the diagonal; orange: where the decisions fall."))
    thresholds = entry.get("thresholds") or {}
    if thresholds:
        sens, spec = entry.get("val_sensitivity") or {}, entry.get("val_specificity") or {}
        parts.append("<h3>Decision thresholds (chosen on validation)</h3>" + table(
            ["class", "threshold", "validation sensitivity", "validation specificity"],
            [[c, fmt(t), fmt(sens.get(c)), fmt(spec.get(c))] for c, t in thresholds.items()], numeric=[1, 2, 3]))
    section.body = "".join(parts)
    return section


def _ece(bins: list[dict]) -> Optional[float]:
    total = sum(b["count"] for b in bins)
    if not total:
        return None
    return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total


def _image_path(meta: dict, run_dir: Path) -> Optional[Path]:
    """A record's image file (`path`, or the first of `images`), as given or relative to the run."""
    images = meta.get("images")
    raw = meta.get("path") or (images[0] if isinstance(images, list) and images else None) or meta.get("image")
    if not raw or not isinstance(raw, str):
        return None
    path = Path(raw)
    return path if path.is_absolute() or path.exists() else (run_dir / path)


def thumbnail_html(meta: dict, run_dir: Path, missing: list[str], css: str = "") -> str:
    """An <img> of the record's image, or a placeholder naming why there is none (its path is added
    to `missing` when the file is gone)."""
    path = _image_path(meta, run_dir)
    if path is None:
        return '<div class="noimg">no image path in the record</div>'
    try:
        data = plots.thumbnail(path)
    except (OSError, ValueError) as err:
        missing.append(str(path))
        reason = "not found" if not path.exists() else f"unreadable ({type(err).__name__})"
        return f'<div class="noimg">image {esc(reason)}:<br>{esc(path.name)}</div>'
    return f'<img class="{css}" src="data:image/jpeg;base64,{data}" alt="{esc(path.name)}">'


def errors_section(run: RunData) -> Section:
    section = Section("errors", "Worst errors")
    if _unavailable(section, run, "galleries of errors"):
        return section
    records = run.records
    a = classification_arrays(records)
    classes = list(records.info["classes"])
    multi = bool(records.info.get("multi_label"))
    probs = probabilities(a["logits"], multi, float(records.info.get("temperature") or 1.0))
    wrong = []
    for i, r in enumerate(records.records):
        if a["target"][i].tolist() == a["predicted"][i].tolist():
            continue
        if multi:  # the most confident wrong decision: a false positive's p, a false negative's 1 - p
            confidence = np.where(a["predicted"][i] & ~a["target"][i], probs[i], 0.0).max(initial=0.0)
            confidence = max(confidence, np.where(~a["predicted"][i] & a["target"][i], 1 - probs[i], 0.0).max(initial=0.0))
        else:
            confidence = float(probs[i, a["predicted"][i]].max()) if a["predicted"][i].any() else 0.0
        wrong.append((float(confidence), i))
    if not wrong:
        section.body = note(f"No errors: all {len(records)} test samples were classified correctly.")
        return section
    wrong.sort(reverse=True)
    missing: list[str] = []
    items = []
    for confidence, i in wrong[:GALLERY]:
        r = records.records[i]
        truth = ", ".join(classes[c] for c in (r.target or [])) or "(none)"
        said = ", ".join(classes[c] for c in (r.prediction or [])) or "(none)"
        extra = "".join(f"<br>{esc(k)}: {esc(v)}" for k, v in r.meta.items()
                        if k not in ("path", "images", "image") and isinstance(v, (str, int, float)))[:300]
        items.append(f'<div class="item">{thumbnail_html(r.meta, run.run_dir, missing)}<div class="cap">'
                     f"true: {esc(truth)}<br>predicted: <b>{esc(said)}</b> ({confidence:.0%}){extra}"
                     f'<div class="id">{esc(r.id)}</div></div></div>')
    parts = [note(f"{len(wrong)} of {len(records)} test samples are wrong; the {len(items)} shown are the ones the "
                  "model was most sure of (its probability for the wrong answer, after temperature scaling when "
                  "fitted).")]
    if missing:
        parts.append(note(f"{len(missing)} image file(s) could not be shown (moved or deleted since the test): "
                          + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""), "warn"))
    parts.append(f'<div class="gallery">{"".join(items)}</div>')
    section.body = "".join(parts)
    return section
