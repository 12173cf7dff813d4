"""The sweep's workers: each asks the study for a trial, runs it as an ordinary `mmtune fit` in its own
process, and tells the study how it ended.

Why a process per trial: a trial that crashes, runs out of memory or produces NaN ends only itself (it
is recorded FAIL with its error and the sweep goes on); `--workers N` runs N at once; a trial can be a
DDP run (Lightning launches its ranks from that process); and the run directory of a trial is exactly
what `mmtune fit --config X.yaml --key value ...` writes, because that is the command. The trial's
values reach the study through the shared storage (`mmtune.tune.reporter`), so the pruner sees them
while it runs, and `trial.json` beside the run carries them back to this process.

Several workers, processes or machines share one study through its storage. Each worker takes the
next trial only while fewer than `n_trials` are finished or running, so the study ends with about
`n_trials` (machines that ask at the same moment can add one each).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

import mmtune
from mmtune.errors import ConfigError
from mmtune.files import read_json
from mmtune.tune.reporter import CALLBACK_PATH, TRIAL_ENV
from mmtune.tune.space import SearchSpec, cli_value
from mmtune.tune.storage import fail_stale_trials, record_heartbeat

# Starts a trial: on Linux the trial process asks to be killed when the sweep process dies
# (PR_SET_PDEATHSIG, kept across exec), then becomes `python -m mmtune fit ...`. Done in the child rather
# than with Popen's preexec_fn, which is unsafe while the sweep's worker threads run. Elsewhere the
# reporter's watchdog thread ends an orphaned trial once its fit starts.
LAUNCHER = ("import ctypes, json, os, signal, sys\n"
            "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
            "except (OSError, AttributeError):\n    pass\n"
            f"if os.getppid() != json.loads(os.environ['{TRIAL_ENV}'])['parent_pid']:\n    sys.exit(3)\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n")
ERROR_ATTR = "error"  # set on trials that failed on their own (not those of a killed sweep)
# Variables a trial must not inherit: it is a new run, not a rank of the sweep's process.
CHILD_ENV_DROP = ("MMTUNE_RUN_DIR", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass
class Sweep:
    spec: SearchSpec
    study: optuna.Study
    storage_url: str
    name: str
    sweep_dir: Path
    configs: list[str]
    overrides: list[str]
    metric: str
    base_values: dict[str, Any]
    deadline: Optional[float] = None
    gpus: int = 0
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    fatal: list = dataclasses.field(default_factory=list)
    on_trial_end: Any = None  # called (under the lock) after each trial this process ran

    @property
    def grace_s(self) -> float:
        return 3 * self.spec.heartbeat_s


def finished_count(study: optuna.Study) -> tuple[int, int]:
    """(finished, running): finished counts complete, pruned and failed-by-error trials; a trial of a
    killed sweep (FAIL without an error) is not counted, as its retry takes its place."""
    finished = running = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs):
            finished += 1
        elif trial.state == TrialState.RUNNING:
            running += 1
    return finished, running


def run_workers(sweep: Sweep) -> None:
    """Runs `spec.workers` workers in threads of this process (each trial is its own process, so the
    threads only wait); re-raises a worker's fatal error (a metric the task never logs, a lost storage)."""
    threads = [threading.Thread(target=_worker, args=(sweep, slot), name=f"tune-worker-{slot}", daemon=True)
               for slot in range(sweep.spec.workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        sweep.stop.set()
        raise
    if sweep.fatal:
        raise sweep.fatal[0]


def _worker(sweep: Sweep, slot: int) -> None:
    try:
        while not sweep.stop.is_set():
            if sweep.deadline is not None and time.time() >= sweep.deadline:
                return
            with sweep.lock:
                fail_stale_trials(sweep.study, sweep.grace_s, sweep.spec.max_retries)
                finished, running = finished_count(sweep.study)
                if finished >= sweep.spec.n_trials:
                    return
                trial = None
                if finished + running < sweep.spec.n_trials:
                    trial = sweep.study.ask()
                    record_heartbeat(sweep.study, trial._trial_id)
            if trial is None:  # the rest are running elsewhere (or in a killed sweep, until stale)
                sweep.stop.wait(min(sweep.spec.heartbeat_s, 2.0))
                continue
            run_trial(sweep, trial, slot)
            if sweep.on_trial_end is not None:
                with sweep.lock:
                    sweep.on_trial_end(sweep)
    except BaseException as err:  # noqa: BLE001 - handed to the main thread
        sweep.fatal.append(err)
        sweep.stop.set()


def trial_command(sweep: Sweep, number: int, params: dict[str, Any]) -> list[str]:
    """The trial's `mmtune fit` command line: the base config(s), the sweep's own overrides, the
    trial's values, its run directory and the reporting callback."""
    cmd = [sys.executable, "-m", "mmtune", "fit"]
    for config in sweep.configs:
        cmd += ["--config", config]
    cmd += sweep.overrides
    cmd += [f"--{key}={cli_value(value)}" for key, value in params.items()]
    if sweep.spec.devices_per_trial:
        cmd += [f"--trainer.devices={sweep.spec.devices_per_trial}"]
    cmd += ["--runs_dir", str(sweep.sweep_dir), "--run_name", f"trial_{number}", f"--trainer.callbacks+={CALLBACK_PATH}"]
    return cmd


def _child_env(sweep: Sweep, trial: optuna.Trial, slot: int, result: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROP}
    # the trial runs the same mmtune as this process (a checkout on PYTHONPATH, not another install)
    root = str(Path(mmtune.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env[TRIAL_ENV] = json.dumps({"storage": sweep.storage_url, "study": sweep.name, "trial_id": trial._trial_id,
                                 "metric": sweep.metric, "pruner": sweep.spec.pruner, "result": str(result),
                                 "parent_pid": os.getpid()})
    per = sweep.spec.devices_per_trial
    if sweep.gpus and per:  # one slice of the GPUs per worker slot
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * per + i) for i in range(per))
    return env


def run_trial(sweep: Sweep, trial: optuna.Trial, slot: int) -> None:
    params = sweep.spec.suggest(trial, sweep.base_values)
    root = sweep.sweep_dir / f"trial_{trial.number}"
    root.mkdir(parents=True, exist_ok=True)
    result = root / "trial.json"
    result.unlink(missing_ok=True)
    trial.set_user_attr("run_dir", str(root))
    trial.set_user_attr("host", os.uname().nodename)
    trial.set_user_attr("sweep_pid", os.getpid())
    started = time.time()
    with open(root / "output.log", "w") as log:
        command = [sys.executable, "-c", LAUNCHER, *trial_command(sweep, trial.number, params)]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_child_env(sweep, trial, slot, result))
        trial.set_user_attr("pid", proc.pid)
        while True:
            try:
                rc = proc.wait(timeout=sweep.spec.heartbeat_s)
                break
            except subprocess.TimeoutExpired:
                record_heartbeat(sweep.study, trial._trial_id)
    seconds = time.time() - started
    _tell(sweep, trial, rc, read_json(result, None), root / "output.log", seconds, params)


def _tell(sweep: Sweep, trial: optuna.Trial, rc: int, data: Optional[dict], log: Path, seconds: float,
          params: dict) -> None:
    shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in params.items())
    trial.set_user_attr("seconds", round(seconds, 2))
    if data and data.get("missing_metric"):
        error = (f"tune: the task never logs metric {sweep.metric!r} at validation; it logs: "
                 f"{', '.join(data.get('logged') or []) or 'nothing'} (set `metric:` in the search file)")
        _fail(sweep, trial, error)
        raise ConfigError(error)
    values = (data or {}).get("values") or []
    if rc != 0:
        error = _error_of(log, rc)
    elif not values:
        error = f"no validation ran, so there is no {sweep.metric} (see {log})"
    elif not math.isfinite(values[-1]):
        error = f"{sweep.metric} was {values[-1]} at validation {len(values)}"
    else:
        error = None
    if error is not None:
        _fail(sweep, trial, error)
        print(f"[mmtune] trial {trial.number} FAILED after {seconds:.1f} s ({shown}): {error}", flush=True)
        return
    if data.get("pruned"):
        sweep.study.tell(trial, state=TrialState.PRUNED)
        print(f"[mmtune] trial {trial.number} pruned at validation {len(values)}: {sweep.metric}={values[-1]:.6g} "
              f"({shown}), {seconds:.1f} s", flush=True)
        return
    # The objective is the best value over the validations: the one `best.ckpt` was saved at.
    pick = min if sweep.study.direction == optuna.study.StudyDirection.MINIMIZE else max
    value = pick(v for v in values if math.isfinite(v))
    sweep.study.tell(trial, value)
    print(f"[mmtune] trial {trial.number} done: {sweep.metric}={value:.6g} ({shown}), {seconds:.1f} s", flush=True)


def _fail(sweep: Sweep, trial: optuna.Trial, error: str) -> None:
    trial.set_user_attr(ERROR_ATTR, error[:1000])
    sweep.study.tell(trial, state=TrialState.FAIL)


def _error_of(log: Path, rc: int) -> str:
    """The trial's own error line (`mmtune: error: ...`), or the last line of its traceback."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("mmtune: error:"):
            return line[len("mmtune: error:"):].strip()
    tail = lines[-1] if lines else "no output"
    return f"exit code {rc}: {tail[:500]} (see {log})"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
