"""Hyperparameter search (`mmtune tune`) on Optuna.

A sweep varies dotted config keys over ranges (`space`), runs each trial as an ordinary `mmtune fit` in
its own process (`runner`) whose validation metric feeds Optuna's pruner (`reporter`), keeps the study
in a storage that survives a kill and that several processes or machines share (`storage`, `study`),
and leaves a leaderboard, the best config and plots in the sweep directory (`results`). `cli` is the
verb. Nothing here is imported by `import mmtune`: Optuna is an extra (`pip install mmtune[tune]`).
"""
