"""Evaluation a team can sign off on: intervals, baseline comparisons, subgroups, calibration, reports.

A room of its own: it reads the per-sample records the tasks hand out (`mmtune.metrics.records`) and
the run directory's files, and is used by the CLI (`mmtune test`, `mmtune evaluate`, `mmtune report`).
It never reaches into a task's internals: the forgetting checks (`retention/`) score a task's model
through its public surface (`task(batch)`, `embed_images`, `classifier`, `tokenizer`).
"""
