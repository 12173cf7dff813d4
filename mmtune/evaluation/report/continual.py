"""The continual section: after every stage of `mmtune continual`, each stage's test accuracy (the
accuracy matrix: row i after training stage i, column j stage j's test set), average forgetting and
backward transfer, as `metrics.json`'s `continual` entry records them."""

from __future__ import annotations

from mmtune.evaluation.report.collect import RunData
from mmtune.evaluation.report.html import Section, facts, fmt, heat_table, note, signed


def continual_section(run: RunData) -> Section:
    section = Section("continual", "Continual stages")
    entry = run.metrics.get("continual") or {}
    matrix = entry.get("accuracy_matrix") or []
    if not matrix:
        section.not_applicable = "not a continual run (mmtune continual writes the accuracy matrix after every stage)"
        return section
    names = list(entry.get("stages") or [f"stage_{k}" for k in range(len(matrix))])
    values = [[float("nan") if v is None else float(v) for v in row] for row in matrix]
    shares = [[0.0 if v is None else float(v) for v in row] for row in matrix]
    grid = heat_table([f"after {n}" for n in names], [f"{n} test" for n in names], values, shares,
                      "accuracy", 3).replace(">nan<", ">–<")
    per_stage = entry.get("forgetting_per_stage") or []
    summary = facts([
        ("average forgetting", fmt(entry.get("average_forgetting"))),
        ("backward transfer", signed(entry.get("backward_transfer"))),
        ("forgetting per stage", ", ".join(f"{n} {fmt(v)}" for n, v in zip(names, per_stage)) or None),
    ])
    section.body = (note("Row: the model after that stage; column: that stage's test set. Forgetting of a stage: its "
                         "best accuracy before the last stage minus its accuracy after it; backward transfer: the "
                         "last row minus the diagonal (negative: forgotten), averaged over the earlier stages.")
                    + grid + summary)
    return section
