"""`mmtune tune`: sweeps of a tiny ViT classifier, each trial a real `mmtune fit` process.

A trial here is a few optimizer steps, but each is its own process (imports and all), so the tests that
run trials are marked slow; the bad-input tests run no trial.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_config

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).parent.parent
SEARCH_FILES = sorted((ROOT / "configs" / "search").glob("*.yaml"))
LR = "model.init_args.optimizer.lr"


def _base(tmp_path, tiny_models, color_set, lr=1e-6, epochs=2) -> Path:
    return write_config(tmp_path / "base.yaml", tiny_models["vit"], color_set,
                        model_args={"adapter": {"method": "lora", "r": 4}, "optimizer": {"lr": lr, "warmup": 0.0},
                                    "monitor": {"early_stopping": False}},
                        trainer={"max_epochs": epochs, "limit_train_batches": 2})


def _search(path: Path, params=None, **settings) -> Path:
    params = params or {LR: {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}
    path.write_text(yaml.safe_dump({"params": params, **settings}, sort_keys=False))
    return path


def _study(runs: Path, name: str, storage: str | None = None):
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{runs / name / 'study.db'}")


def _tune_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("tune", *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- bad input: no trial runs ---------------------------------------------------------------------

def test_unknown_search_key_names_the_nearest_keys(tmp_path, tiny_models, color_set, capsys):
    base = _base(tmp_path, tiny_models, color_set)
    search = _search(tmp_path / "s.yaml", {"model.init_args.optimizer.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    err = _tune_error(capsys, "--config", base, "--search", search, "--runs_dir", tmp_path / "runs")
    assert "'model.init_args.optimizer.lrr' is not a key" in err and "model.init_args.optimizer.lr" in err
    assert not (tmp_path / "runs").exists(), "a refused search must not create a sweep"


@pytest.mark.parametrize("param,message", [
    ({"type": "float", "low": 0.1, "high": 0.01}, "empty range: low (0.1) must be below high (0.01)"),
    ({"type": "float", "low": 0.0, "high": 0.1, "log": True}, "a log range needs low > 0"),
    ({"type": "categorical", "choices": []}, "`choices` must be a non-empty list"),
    ({"type": "int", "low": 4, "high": 4}, "empty range"),
    ({"type": "normal", "low": 0, "high": 1}, "type must be one of float, int, categorical"),
])
def test_contradictory_ranges_are_refused(tmp_path, tiny_models, color_set, capsys, param, message):
    base = _base(tmp_path, tiny_models, color_set)
    err = _tune_error(capsys, "--config", base, "--search", _search(tmp_path / "s.yaml", {LR: param}),
                      "--runs_dir", tmp_path / "runs")
    assert f"params.{LR}" in err and message in err


def test_a_conditional_key_must_follow_what_it_depends_on(tmp_path, tiny_models, color_set, capsys):
    params = {"model.init_args.adapter.r": {"type": "int", "low": 2, "high": 8,
                                            "when": {"model.init_args.adapter.method": "lora"}},
              "model.init_args.adapter.method": {"choices": ["none", "lora"]}}
    err = _tune_error(capsys, "--config", _base(tmp_path, tiny_models, color_set), "--search",
                      _search(tmp_path / "s.yaml", params), "--runs_dir", tmp_path / "runs")
    assert "must be searched before it" in err


def test_unreachable_storage_is_a_clear_error_and_writes_nothing(tmp_path, tiny_models, color_set, capsys):
    base, search = _base(tmp_path, tiny_models, color_set), _search(tmp_path / "s.yaml")
    for url in ("sqlite:////nonexistent-mmtune-dir/sub/study.db", "postgresql://sweeper:secret@127.0.0.1:9/studies"):
        err = _tune_error(capsys, "--config", base, "--search", search, "--runs_dir", tmp_path / "runs", "--storage", url)
        assert "cannot be reached or opened" in err and "nothing was written" in err
        assert "secret" not in err
    assert not (tmp_path / "runs").exists()


def test_a_search_section_inside_the_config_is_read_and_left_out_of_the_trials(tmp_path, tiny_models, color_set, capsys):
    base = _base(tmp_path, tiny_models, color_set)
    config = yaml.safe_load(base.read_text())
    config["search"] = {"params": {"model.init_args.adapter.rank": {"type": "int", "low": 2, "high": 8}}}
    both = tmp_path / "with_search.yaml"
    both.write_text(yaml.safe_dump(config))
    # the config without its search section parses (else "does not parse"); the typo'd key is named
    err = _tune_error(capsys, "--config", both, "--search", both, "--runs_dir", tmp_path / "runs")
    assert "'model.init_args.adapter.rank' is not a key" in err and "model.init_args.adapter.r" in err


def test_grid_and_setting_checks():
    from mmtune.errors import ConfigError
    from mmtune.tune.space import cli_value, parse_search

    lr = {LR: {"type": "float", "low": 1e-4, "high": 1e-2}}
    with pytest.raises(ConfigError, match="the grid sampler needs `step`"):
        parse_search({"sampler": "grid", "params": lr}, "s.yaml")
    grid = parse_search({"sampler": "grid", "params": {"a.b": {"type": "int", "low": 2, "high": 8, "step": 3}}}, "s.yaml")
    assert grid.params[0].grid_values() == [2, 5, 8]
    with pytest.raises(ConfigError, match="cannot search conditional keys"):
        parse_search({"sampler": "grid", "params": {"a.m": ["x", "y"], "a.r": {"choices": [1, 2], "when": {"a.m": "x"}}}},
                     "s.yaml")
    with pytest.raises(ConfigError, match="unknown search setting 'n_trial'; did you mean 'n_trials'"):
        parse_search({"n_trial": 3, "params": lr}, "s.yaml")
    with pytest.raises(ConfigError, match="enqueue names 'model.init_args.optimizer.lrr'"):
        parse_search({"enqueue": [{LR + "r": 0.1}], "params": lr}, "s.yaml")
    for value in (1e-05, 0.003, 3, True, "lora"):  # an override reads back as the same value
        assert yaml.safe_load(cli_value(value)) == value


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes"])
def test_each_sampler_searches_the_space_it_is_given(sampler):
    """The samplers a search file names drive Optuna's real samplers over the parsed space (here on a
    known bowl, not a fit: what the sampler does with a metric is Optuna's, what it is given is ours)."""
    import optuna

    from mmtune.tune.space import parse_search
    from mmtune.tune.study import build_sampler

    spec = parse_search({"sampler": sampler, "seed": 1, "n_trials": 40, "params": {
        "a.x": {"type": "float", "low": -2.0, "high": 2.0}, "a.y": {"type": "float", "low": 1e-4, "high": 1.0, "log": True}}},
        "s.yaml")
    built = build_sampler(spec)
    assert type(built).__name__ == {"tpe": "TPESampler", "random": "RandomSampler", "cmaes": "CmaEsSampler"}[sampler]
    study = optuna.create_study(sampler=built)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def bowl(trial):
        values = spec.suggest(trial, {})
        x, y = values["a.x"], values["a.y"]
        assert -2.0 <= x <= 2.0 and 1e-4 <= y <= 1.0
        return (x - 0.5) ** 2 + (math.log10(y) + 2) ** 2

    study.optimize(bowl, n_trials=40)
    assert study.best_value < 0.5, (sampler, study.best_params)


def test_configured_search_spaces_fit_their_configs():
    """Every file in configs/search/ parses, and its keys are keys of the configs it feeds."""
    from mmtune.tune.cli import objective_of, resolve_config
    from mmtune.tune.space import check_keys, parse_search, read_search

    assert len(SEARCH_FILES) >= 3
    for path in SEARCH_FILES:
        raw, _ = read_search(path)
        spec = parse_search(raw, str(path), base_dir=path.parent)
        assert spec.config and all(Path(c).is_file() for c in spec.config), path
        resolved = resolve_config(spec.config, [])
        keys = check_keys(spec, resolved, path.name)
        metric, direction = objective_of(spec, resolved)
        assert metric == keys["model.init_args.monitor.metric"] and direction in ("minimize", "maximize")


def test_tune_help_is_fast_and_lists_the_verb():
    from mmtune.entry import PLAIN_VERBS, VERBS

    assert "tune" in VERBS and "tune" in PLAIN_VERBS
    code = ("import sys, mmtune.entry\ntry:\n    mmtune.entry.main(['tune', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('optuna' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "--storage" in done.stdout and done.stdout.strip().endswith("False False")


# --- sweeps ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sweep_from_a_bad_default_finds_a_better_lr_and_best_yaml_reproduces_it(tmp_path, tiny_models, color_set, capsys):
    runs = tmp_path / "runs"
    base = _base(tmp_path, tiny_models, color_set, lr=1e-6)
    # trial 0 is the config's own (bad) learning rate; the sampler picks the next one
    search = _search(tmp_path / "lr.yaml", {LR: {"type": "float", "low": 1e-6, "high": 1e-1, "log": True}},
                     sampler="random", seed=6, n_trials=2, keep_checkpoints=1, enqueue=[{LR: 1e-6}])
    run_cli("tune", "--config", base, "--search", search, "--runs_dir", runs)
    out = capsys.readouterr().out
    study = _study(runs, "lr")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    default, found = trials
    assert default.params[LR] == 1e-6 and found.params[LR] > 1e-6
    assert found.value < default.value - 0.05, (found.value, default.value)
    assert study.best_trial.number == found.number and f"best: trial {found.number}" in out

    sweep = runs / "lr"
    board = _read_csv(sweep / "leaderboard.csv")
    assert [r["number"] for r in board] == [str(found.number), str(default.number)]
    assert float(board[0]["value"]) == pytest.approx(found.value) and float(board[0][LR]) == found.params[LR]
    for name in ("history.png", "importances.png", "parallel_coordinates.png"):
        assert (sweep / name).stat().st_size > 5000, name
    page = (sweep / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Leaderboard" in page
    # each trial is an ordinary run; checkpoints stay for the best trial only (keep_checkpoints: 1)
    for trial in trials:
        run = sweep / f"trial_{trial.number}" / "version_0"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["init_args"]["optimizer"]["lr"] == trial.params[LR]
        assert (run / "checkpoints" / "best.ckpt").is_file() == (trial.number == found.number)

    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best["model"]["init_args"]["optimizer"]["lr"] == found.params[LR]
    run_cli("fit", "--config", sweep / "best.yaml", "--runs_dir", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "lr_best" / "version_0" / "metrics.json").read_text())
    assert again["fit"]["monitor"] == "val/loss"
    assert again["fit"]["best_score"] == pytest.approx(found.value, rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_median_pruner_stops_a_clearly_worse_trial(tmp_path, tiny_models, color_set):
    runs = tmp_path / "runs"
    base = _base(tmp_path, tiny_models, color_set, epochs=3)
    search = _search(tmp_path / "prune.yaml", {LR: {"type": "float", "low": 1e-6, "high": 1e-1, "log": True}},
                     n_trials=2, enqueue=[{LR: 3e-3}, {LR: 1e-6}],
                     pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    run_cli("tune", "--config", base, "--search", search, "--runs_dir", runs)
    good, bad = _study(runs, "prune").get_trials()
    assert good.state.name == "COMPLETE" and len(good.intermediate_values) == 3
    assert bad.state.name == "PRUNED" and bad.params[LR] == 1e-6
    assert list(bad.intermediate_values) == [1], "pruned at its first validation"
    assert bad.value == bad.intermediate_values[1] > good.intermediate_values[1]  # recorded with its last value
    metrics = json.loads((runs / "prune" / f"trial_{bad.number}" / "version_0" / "metrics.json").read_text())
    assert metrics["fit"]["epochs"] < 3


@pytest.mark.slow
def test_a_metric_the_task_never_logs_stops_the_sweep_at_the_first_validation(tmp_path, tiny_models, color_set, capsys):
    runs = tmp_path / "runs"
    err = _tune_error(capsys, "--config", _base(tmp_path, tiny_models, color_set), "--search",
                      _search(tmp_path / "m.yaml", n_trials=3), "--runs_dir", runs,
                      "--metric", "val/dice", "--direction", "maximize")
    assert "never logs metric 'val/dice'" in err and "val/loss" in err and "val/accuracy" in err
    trials = _study(runs, "m").get_trials()
    assert len(trials) == 1 and trials[0].state.name == "FAIL"


def _sweep_process(args: list, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mmtune", "tune", *map(str, args)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _gone(pid: int, within: float) -> bool:
    end = time.time() + within
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return True  # a zombie of the killed sweep: it no longer runs
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_kill_9_of_the_sweep_and_the_same_command_again_finish_the_study(tmp_path, tiny_models, color_set):
    runs = tmp_path / "runs"
    args = ["--config", _base(tmp_path, tiny_models, color_set), "--search", _search(tmp_path / "k.yaml", n_trials=2),
            "--runs_dir", runs, "--heartbeat_s", 1]
    first = _sweep_process(args, tmp_path / "first.log")
    deadline = time.time() + 240
    while not (runs / "k" / "trial_0" / "output.log").is_file():
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.5)
    time.sleep(4)  # trial 0 is running
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = _study(runs, "k").get_trials()
    assert [t.state.name for t in killed] == ["RUNNING"]
    assert _gone(killed[0].user_attrs["pid"], within=30), "the trial of a killed sweep must end too"

    run_cli("tune", *args)
    trials = _study(runs, "k").get_trials()
    assert [t.number for t in trials] == list(range(len(trials))), "every trial number once"
    states = [t.state.name for t in trials]
    assert states[0] == "FAIL" and "error" not in trials[0].user_attrs  # the killed one, retried
    assert states.count("COMPLETE") == 2 and len(trials) == 3
    assert trials[1].params == trials[0].params  # the retry runs the killed trial's values
    assert len(_read_csv(runs / "k" / "leaderboard.csv")) == 3


@pytest.mark.slow
def test_two_sweep_processes_share_one_journal_study(tmp_path, tiny_models, color_set):
    runs, journal = tmp_path / "runs", tmp_path / "shared.journal"
    args = ["--config", _base(tmp_path, tiny_models, color_set), "--search", _search(tmp_path / "j.yaml", n_trials=3),
            "--runs_dir", runs, "--storage", f"journal:{journal}", "--name", "shared"]
    workers = [_sweep_process(args, tmp_path / f"worker{i}.log") for i in range(2)]
    for i, proc in enumerate(workers):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"worker{i}.log").read_text()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))) and len(set(numbers)) == len(numbers)
    assert 3 <= sum(t.state.name == "COMPLETE" for t in trials) <= len(trials) <= 4
    assert len({t.user_attrs["sweep_pid"] for t in trials}) == 2, "both processes ran trials"
    assert all((runs / "shared" / f"trial_{n}" / "version_0" / "metrics.json").is_file() for n in numbers)


@pytest.mark.slow
def test_a_trial_can_be_a_ddp_run_and_a_pruned_ddp_trial_stops_on_every_rank(tmp_path, tiny_models, color_set):
    """`devices_per_trial: 2`: the trial is a two-process DDP fit (CPU here, gloo). Rank 0 reports to the
    study and broadcasts the pruner's decision, so the pruned trial ends on both ranks (no rank left
    waiting in the next epoch's collectives). The threshold pruner makes the decision certain: any
    validation loss is above 0."""
    runs = tmp_path / "runs"
    base = _base(tmp_path, tiny_models, color_set, epochs=3)
    search = _search(tmp_path / "ddp.yaml", n_trials=1, devices_per_trial=2, pruner={"type": "threshold", "upper": 0.0})
    run_cli("tune", "--config", ROOT / "configs" / "trainer" / "ddp.yaml", "--config", base, "--search", search,
            "--runs_dir", runs, "--trainer.accelerator", "cpu", "--trainer.precision", "32-true")
    (trial,) = _study(runs, "ddp").get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    run = runs / "ddp" / f"trial_{trial.number}"
    result = json.loads((run / "trial.json").read_text())
    assert result["pruned"] and len(result["values"]) == 1
    metrics = json.loads((run / "version_0" / "metrics.json").read_text())
    assert metrics["fit"]["epochs"] == 1, "both ranks stopped at the validation that pruned the trial"
    assert [p.name for p in run.iterdir() if p.name.startswith("version_")] == ["version_0"]  # rank 1 wrote none
    config = yaml.safe_load((run / "version_0" / "config.yaml").read_text())
    assert int(config["trainer"]["devices"]) == 2 and config["trainer"]["strategy"] == "ddp"
