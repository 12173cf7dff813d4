"""What a sweep leaves in its directory: `leaderboard.csv` (every trial), `best.yaml` (the best trial's
config, which `mmtune fit --config best.yaml` runs as it is), Optuna's plots as PNGs, and the
checkpoints of the best `keep_checkpoints` trials only."""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from mmtune.files import atomic_write, write_text_atomic
from mmtune.tune.reporter import CALLBACK_PATH
from mmtune.tune.space import set_dotted

log = logging.getLogger("mmtune")


def _ranked(study: optuna.Study) -> list[FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    ranked = _ranked(study)
    return ranked[0] if ranked else None


def write_leaderboard(study: optuna.Study, path: Path) -> Path:
    """One row per trial, best first then the unfinished: number, state, value, each parameter,
    seconds, start and end times, the error of a failed trial, its run folder."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    rank = {t.number: i for i, t in enumerate(_ranked(study), 1)}
    rows = sorted(trials, key=lambda t: (rank.get(t.number, len(trials) + 1), t.number))
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "number", "state", "value", *keys, "seconds", "started", "completed", "validations",
                         "error", "run_dir"])
        for t in rows:
            writer.writerow([rank.get(t.number, ""), t.number, t.state.name, "" if t.value is None else t.value,
                             *[t.params.get(k, "") for k in keys], t.user_attrs.get("seconds", ""),
                             _time(t.datetime_start), _time(t.datetime_complete), len(t.intermediate_values),
                             t.user_attrs.get("error", ""), t.user_attrs.get("run_dir", "")])
    return path


def _time(moment) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else ""


def best_config(resolved: dict, trial: FrozenTrial, run_name: str) -> dict:
    """The resolved base config (with the sweep's overrides) and the best trial's values: what that
    trial ran, without the sweep's reporting callback."""
    config = copy.deepcopy(resolved)
    for key, value in trial.params.items():
        set_dotted(config, key, value)
    for key in ("config", "ckpt_path"):
        config.pop(key, None)
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks")
    if isinstance(callbacks, list):
        kept = [c for c in callbacks if not (isinstance(c, dict) and c.get("class_path") == CALLBACK_PATH)]
        trainer["callbacks"] = kept or None
    config["run_name"] = run_name
    return config


def write_best(study: optuna.Study, resolved: dict, path: Path, run_name: str, metric: str) -> Optional[FrozenTrial]:
    best = best_trial(study)
    if best is None:
        return None
    head = (f"# best trial of sweep {study.study_name!r}: trial {best.number}, {metric} = {best.value:.6g}\n"
            f"# run it as it is: mmtune fit --config {path}\n")
    write_text_atomic(path, head + yaml.safe_dump(best_config(resolved, best, run_name), sort_keys=False))
    return best


def keep_best_checkpoints(study: optuna.Study, sweep_dir: Path, keep: int) -> int:
    """Deletes the `.ckpt` files of every finished trial of this sweep directory outside the best
    `keep`; returns how many files went."""
    kept = {t.number for t in _ranked(study)[:keep]}
    removed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if trial.number in kept:
            continue
        for ckpt in (sweep_dir / f"trial_{trial.number}").glob("version_*/checkpoints/*.ckpt"):
            ckpt.unlink(missing_ok=True)
            removed += 1
    return removed


def write_plots(study: optuna.Study, sweep_dir: Path) -> dict[str, str]:
    """Optuna's matplotlib plots as PNGs; returns {file: why not} for the ones that could not be drawn
    (importances need two finished trials and a parameter that varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    skipped = {}
    plots = {"history.png": vis.plot_optimization_history, "importances.png": vis.plot_param_importances,
             "parallel_coordinates.png": vis.plot_parallel_coordinate}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100)
            plt.close(figure)
            with atomic_write(sweep_dir / name, "wb") as f:
                f.write(buffer.getvalue())
        except Exception as err:  # noqa: BLE001 - a plot is never worth failing a finished sweep
            skipped[name] = f"{type(err).__name__}: {str(err)[:200]}"
    return skipped


def summary(study: optuna.Study, metric: str, sweep_dir: Path, skipped_plots: dict[str, str]) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    lines = [f"[mmtune] sweep {study.study_name!r}: {len(trials)} trials ("
             + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"), {study.direction.name.lower()} {metric}"]
    best = best_trial(study)
    if best is None:
        lines.append("[mmtune] no trial completed: see the errors in leaderboard.csv")
    else:
        lines.append(f"[mmtune] best: trial {best.number}, {metric} = {_fmt(best.value)}")
        lines += [f"[mmtune]   {k} = {_fmt(v)}" for k, v in best.params.items()]
        lines.append(f"[mmtune] best config: {sweep_dir / 'best.yaml'} (mmtune fit --config {sweep_dir / 'best.yaml'})")
    lines.append(f"[mmtune] leaderboard: {sweep_dir / 'leaderboard.csv'}")
    for name, why in skipped_plots.items():
        lines.append(f"[mmtune] plot {name} not drawn: {why}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)
