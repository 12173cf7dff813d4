"""The sweep's `report.html`: the best trial, the leaderboard and the plots in one self-contained page,
built with the run report's HTML builders (`mmtune.evaluation.report.html`), so it reads like a run's."""

from __future__ import annotations

import base64
import html as _html
from pathlib import Path

import optuna

from mmtune.evaluation.report.html import Section, facts, figure, fmt, note, page, table
from mmtune.files import write_text_atomic
from mmtune.tune.results import best_trial

PLOTS = (("history.png", "Optimisation history"), ("importances.png", "Parameter importances"),
         ("parallel_coordinates.png", "Parallel coordinates"))


def write_sweep_report(study: optuna.Study, metric: str, sweep_dir: Path) -> Path:
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    best = best_trial(study)
    summary = facts([("study", study.study_name), ("objective", f"{study.direction.name.lower()} {metric}"),
                     ("trials", len(trials)),
                     *[(s.name.lower(), sum(t.state == s for t in trials)) for s in optuna.trial.TrialState
                       if any(t.state == s for t in trials)],
                     ("best trial", best.number if best else None), (f"best {metric}", fmt(best.value) if best else None),
                     *[(k, fmt(v)) for k, v in (best.params.items() if best else [])],
                     ("best config", "best.yaml" if best else None)])
    ranked = sorted(trials, key=lambda t: (t.value is None or t.state.name != "COMPLETE",
                                          (t.value or 0) * (-1 if study.direction.name == "MAXIMIZE" else 1)))
    rows = [[t.number, t.state.name, fmt(t.value), *[fmt(t.params.get(k, "")) for k in keys],
             t.user_attrs.get("seconds", ""), len(t.intermediate_values), t.user_attrs.get("error", "")] for t in ranked]
    board = table(["trial", "state", metric, *keys, "seconds", "validations", "error"], rows,
                  numeric=[0, 2, *range(3, 3 + len(keys)), 3 + len(keys), 4 + len(keys)])
    figures = "".join(figure(base64.b64encode((sweep_dir / name).read_bytes()).decode(), title, title)
                      for name, title in PLOTS if (sweep_dir / name).is_file())
    sections = [Section("summary", "Best trial", summary),
                Section("leaderboard", "Leaderboard", board),
                Section("plots", "Plots", figures or note("no plot could be drawn (too few finished trials)"),
                        missing=None if figures else "plots (too few finished trials)")]
    header = f"<h1>Sweep {_html.escape(study.study_name)}</h1>"
    path = sweep_dir / "report.html"
    write_text_atomic(path, page(f"mmtune sweep {study.study_name}", header, sections,
                                 "Written by mmtune tune from the study; leaderboard.csv holds the same rows."))
    return path
