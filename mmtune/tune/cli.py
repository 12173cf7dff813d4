"""`mmtune tune --config X.yaml --search S.yaml`: a hyperparameter sweep on Optuna.

Order of work, so that mistakes cost nothing: the search file is checked (ranges, settings), its keys
against the resolved base config (`mmtune fit --print_config` of the same configs and overrides), the
objective's direction is known, and only then the storage is opened and trials start. Arguments the
verb does not know (`--trainer.max_epochs 3`) are passed to every trial, like `mmtune fit` takes them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import time
from pathlib import Path
from typing import Optional

import yaml

from mmtune.errors import ConfigError

DESCRIPTION = "Search hyperparameters with Optuna: each trial is a `mmtune fit` run (pruning, resumable studies, workers)."


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage before a mistake; mmtune says the mistake in one line (`mmtune tune --help`
    for the usage), like every other verb."""

    def error(self, message: str):
        raise ConfigError(f"{message} (mmtune tune --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="mmtune tune", description=DESCRIPTION, epilog=(
        "Other arguments (e.g. --trainer.max_epochs 3) go to every trial. Several machines share one study "
        "when each runs the same command with the same --storage (a database URL or journal:PATH on a shared disk)."))
    p.add_argument("--config", action="append", default=[], help="Base config(s) of every trial (default: the search file's `config`)")
    p.add_argument("--search", required=True, help="Search file (params and settings), or a config with a `search:` section")
    p.add_argument("--name", help="Sweep and study name (default: the search file's name); trials go to runs_dir/name/trial_N")
    p.add_argument("--runs_dir", default="runs", help="Root folder of runs (default: runs)")
    p.add_argument("--storage", help="Optuna storage: a database URL (postgresql://..., mysql://..., sqlite:///f.db) or "
                                     "journal:PATH (default: sqlite file runs_dir/name/study.db)")
    p.add_argument("--n_trials", type=int)
    p.add_argument("--timeout", type=float, help="Seconds after which no new trial starts (running ones finish)")
    p.add_argument("--seed", type=int)
    p.add_argument("--sampler", choices=("tpe", "random", "grid", "cmaes"))
    p.add_argument("--pruner", choices=("none", "median", "percentile", "threshold", "hyperband", "asha"))
    p.add_argument("--metric", help="Objective: a metric logged at validation (default: the task's monitor metric)")
    p.add_argument("--direction", choices=("minimize", "maximize"))
    p.add_argument("--workers", type=int, help="Trials at once on this machine (one per GPU when there are GPUs)")
    p.add_argument("--devices_per_trial", type=int, help="Devices of each trial (a trial with more than one is a DDP run)")
    p.add_argument("--keep_checkpoints", type=int, help="Keep checkpoints of the best this many trials (default 1)")
    p.add_argument("--heartbeat_s", type=float, help="Seconds between heartbeats; a trial silent 3x as long is retried")
    return p


def load_spec(args: argparse.Namespace):
    """The search spec with the command line's settings applied, and the config files it feeds (a
    config with a `search:` section is fed without it)."""
    from mmtune.tune.space import check_settings, parse_pruner, parse_search, read_search

    raw, path = read_search(args.search)
    spec = parse_search(raw, str(path), base_dir=path.parent)
    overrides = {k: getattr(args, k) for k in ("n_trials", "timeout", "seed", "sampler", "metric", "direction",
                                               "workers", "devices_per_trial", "keep_checkpoints", "heartbeat_s")
                 if getattr(args, k) is not None}
    spec = dataclasses.replace(spec, **overrides)
    if args.pruner is not None:
        spec.pruner = parse_pruner(args.pruner, spec.source)
    check_settings(spec)
    configs = list(args.config) or spec.config
    if not configs:
        raise ConfigError(f"{path}: no base config: give --config X.yaml or `config:` in the search file")
    for config in configs:
        if not Path(config).is_file():
            raise ConfigError(f"config {config}: file not found")
    return spec, configs, path


def resolve_config(configs: list[str], overrides: list[str]) -> dict:
    """The base config as `mmtune fit --print_config` resolves it (defaults filled in, overrides applied)."""
    from mmtune.cli import run_lightning

    out, err = io.StringIO(), io.StringIO()
    argv = ["fit", *[a for c in configs for a in ("--config", c)], *overrides, "--print_config"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_lightning(argv)
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            raise ConfigError(f"base config {', '.join(configs)} does not parse: {lines[-1] if lines else exit_info.code}") from None
    resolved = yaml.safe_load(out.getvalue())
    if not isinstance(resolved, dict):
        raise ConfigError(f"base config {', '.join(configs)}: --print_config printed no config")
    return resolved


def _strip_search(configs: list[str], sweep_dir: Path) -> list[str]:
    """A config holding the `search:` section is fed to trials without it (the fit does not know it)."""
    out = []
    for config in configs:
        data = yaml.safe_load(Path(config).read_text()) or {}
        if isinstance(data, dict) and "search" in data:
            data.pop("search")
            sweep_dir.mkdir(parents=True, exist_ok=True)
            stripped = sweep_dir / f"base_{Path(config).name}"
            stripped.write_text(yaml.safe_dump(data, sort_keys=False))
            config = str(stripped)
        out.append(config)
    return out


def objective_of(spec, resolved: dict) -> tuple[str, str]:
    """(metric, direction): the task's monitor and its mode unless the search file names them."""
    monitor = ((resolved.get("model") or {}).get("init_args") or {}).get("monitor") or {}
    metric = spec.metric or monitor.get("metric")
    if not metric:
        raise ConfigError(f"{spec.source}: the task has no monitor metric: set `metric:` (and `direction:`)")
    direction = spec.direction
    if direction is None:
        if metric != monitor.get("metric"):
            raise ConfigError(f"{spec.source}: metric {metric!r} is not the task's monitor ({monitor.get('metric')}): "
                              "set `direction: minimize` or `maximize`")
        direction = "maximize" if monitor.get("mode") == "max" else "minimize"
    return metric, direction


def _gpus(spec) -> int:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and spec.devices_per_trial is None and spec.workers > 1:
        spec.devices_per_trial = 1  # one trial per GPU
    if count and spec.devices_per_trial and spec.workers * spec.devices_per_trial > count:
        raise ConfigError(f"--workers {spec.workers} x devices_per_trial {spec.devices_per_trial} needs "
                          f"{spec.workers * spec.devices_per_trial} GPUs; this machine has {count}")
    return count


def main(argv: list[str]) -> None:
    args, passthrough = build_parser().parse_known_args(argv)
    stray = [a for a in passthrough if a.startswith("-") and not a.startswith("--")]
    if stray:
        raise ConfigError(f"mmtune tune: unknown option {stray[0]!r} (mmtune tune --help)")
    spec, configs, search_path = load_spec(args)
    name = args.name or search_path.stem
    sweep_dir = Path(args.runs_dir) / name
    configs = _strip_search(configs, sweep_dir)
    resolved = resolve_config(configs, passthrough)
    from mmtune.tune.space import check_keys

    base_values = check_keys(spec, resolved, " + ".join(configs))
    metric, direction = objective_of(spec, resolved)
    if spec.sampler == "grid":
        import math

        size = math.prod(len(p.grid_values()) for p in spec.params)
        spec.n_trials = min(spec.n_trials, size)
    gpus = _gpus(spec)

    from mmtune.tune import results
    from mmtune.tune.runner import Sweep, run_workers
    from mmtune.tune.storage import open_storage, shown_url, storage_url
    from mmtune.tune.study import open_study

    if args.storage is None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(args.storage, sweep_dir)
    storage = open_storage(url, heartbeat_s=spec.heartbeat_s, max_retries=spec.max_retries)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(spec, name, storage, direction)
    if spec.enqueue and not study.get_trials(deepcopy=False):  # only when the study is new (not on a rerun)
        for values in spec.enqueue:
            study.enqueue_trial(values, skip_if_exists=True)
    best_run_name = f"{name}_best"

    def after_trial(sweep: Sweep) -> None:
        results.write_leaderboard(sweep.study, sweep_dir / "leaderboard.csv")
        results.write_best(sweep.study, resolved, sweep_dir / "best.yaml", best_run_name, metric)
        results.keep_best_checkpoints(sweep.study, sweep_dir, spec.keep_checkpoints)

    sweep = Sweep(spec=spec, study=study, storage_url=url, name=name, sweep_dir=sweep_dir, configs=configs,
                  overrides=passthrough, metric=metric, base_values=base_values, gpus=gpus,
                  deadline=time.time() + spec.timeout if spec.timeout else None, on_trial_end=after_trial)
    print(f"[mmtune] sweep {name!r}: {spec.n_trials} trials, {direction} {metric}, sampler {spec.sampler}, "
          f"pruner {spec.pruner['type']}, {spec.workers} worker(s), storage {shown_url(url)}", flush=True)
    try:
        run_workers(sweep)
    finally:
        after_trial(sweep)
    skipped = results.write_plots(study, sweep_dir)
    from mmtune.tune.report import write_sweep_report

    try:
        report = write_sweep_report(study, metric, sweep_dir)
        print(f"[mmtune] sweep report: {report}", flush=True)
    except Exception as err:  # noqa: BLE001 - the leaderboard and best.yaml are written; a page is not worth failing
        print(f"[mmtune] the sweep report was not written ({type(err).__name__}: {err})", flush=True)
    print(results.summary(study, metric, sweep_dir, skipped), flush=True)

