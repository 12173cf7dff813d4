"""Optuna's samplers and pruners from the search file's names, and the study itself."""

from __future__ import annotations

import optuna

from mmtune.errors import ConfigError
from mmtune.tune.space import SearchSpec


def build_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid_values() for p in spec.params}, seed=spec.seed)
    if spec.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (CmaEsSampler's own dependency)
        except ImportError:
            raise ConfigError(f"{spec.source}: sampler cmaes needs the `cmaes` package (pip install cmaes)") from None
        return optuna.samplers.CmaEsSampler(seed=spec.seed, warn_independent_sampling=False)
    # multivariate + group: TPE models the keys jointly and handles conditional keys (`when`)
    conditional = any(p.when for p in spec.params)
    return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=conditional,
                                      n_startup_trials=min(10, max(2, spec.n_trials // 3)))


def build_pruner(pruner: dict) -> optuna.pruners.BasePruner:
    """`{type: median, n_startup_trials: 2, n_warmup_steps: 1}`, `{type: hyperband, min_resource: 1,
    max_resource: auto, reduction_factor: 3}`, `{type: asha, ...}`, `{type: percentile, percentile: 25}`,
    `{type: threshold, upper: 2.0}` (stop a trial whose loss leaves a bound): the rest are the pruner's own
    arguments. Steps are validations (1, 2, ...), the same across trials whatever their batch size."""
    kind = pruner.get("type", "none")
    args = {k: v for k, v in pruner.items() if k != "type"}
    classes = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "percentile": optuna.pruners.PercentilePruner, "threshold": optuna.pruners.ThresholdPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "asha": optuna.pruners.SuccessiveHalvingPruner}
    try:
        return classes[kind](**args)
    except TypeError as err:
        raise ConfigError(f"search: pruner {kind}: {err}") from None


def open_study(spec: SearchSpec, name: str, storage: optuna.storages.BaseStorage, direction: str) -> optuna.Study:
    """Creates the study, or loads it when the storage already has one of this name (a rerun after a
    kill, or another machine's worker); its direction must agree."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction,
                                    sampler=build_sampler(spec), pruner=build_pruner(spec.pruner), load_if_exists=True)
    except optuna.exceptions.DuplicatedStudyError:  # created by another worker at the same moment
        study = optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(spec),
                                  pruner=build_pruner(spec.pruner))
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} in this storage was created to {study.direction.name.lower()}; this "
                          f"search says {direction} (use another --name, or the same metric and direction)")
    return study
