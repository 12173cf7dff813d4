"""Where a study lives, and how trials of a killed sweep are found and retried.

Default: an SQLite file in the sweep directory (`runs/<sweep>/study.db`): the same command after a
`kill -9` opens it again and goes on. `--storage URL` takes any database URL SQLAlchemy knows
(PostgreSQL, MySQL) for many machines; `--storage journal:PATH` is Optuna's journal file (one file on a
shared disk, no database server).

Stale trials: a trial whose sweep process died stays RUNNING in the storage. Every sweep process
records a heartbeat for its running trials; a RUNNING trial whose heartbeat is older than the grace
period is marked FAIL and re-queued with the same parameters (Optuna's
`RetryHeartbeatStaleTrialCallback`). Optuna's own heartbeat (`RDBStorage(heartbeat_interval=...)` with
`optuna.storages.fail_stale_trials`) is used for databases; `JournalStorage` has none in Optuna 5.1, so
for journal files the heartbeat is a trial attribute and the same check is made here (the only part
written by hand).
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mmtune.errors import ConfigError

HEARTBEAT_ATTR = "mmtune_heartbeat"
# Heartbeats and the retry callback are "experimental" in Optuna 5.1 and warn on every use; the sweep
# records heartbeats around its own trial processes rather than inside Study.optimize, which Optuna
# also warns about. Both are intended here.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def storage_url(storage: Optional[str], sweep_dir: Path) -> str:
    return storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_storage(url: str, heartbeat_s: Optional[float] = None, max_retries: int = 1) -> BaseStorage:
    """Opens (or creates) the storage at `url`; one clear error when it cannot be reached. Nothing is
    written before it is reached. `heartbeat_s=None` opens it without stale-trial handling (a trial's
    own process, which only reports values)."""
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url[len("journal:"):])
            if not path.parent.is_dir():
                raise ConfigError(f"--storage {url}: folder {path.parent} does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        kwargs = {}
        if url.startswith("sqlite:"):
            # Several processes (workers, trial processes reporting values) write to one file: wait for
            # the lock instead of failing at SQLite's default of 5 s.
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        if heartbeat_s is not None:
            kwargs.update(heartbeat_interval=max(1, int(round(heartbeat_s))),
                          grace_period=max(2, int(round(3 * heartbeat_s))),
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retries))
        return RDBStorage(url, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - a driver's error, a refused connection, a bad URL
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"--storage {shown_url(url)}: cannot be reached or opened ({type(err).__name__}: {text[:300]}); "
                          "nothing was written") from None


def shown_url(url: str) -> str:
    """A storage URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def record_heartbeat(study: optuna.Study, trial_id: int) -> None:
    storage = study._storage
    if isinstance(storage, RDBStorage):
        storage.record_heartbeat(trial_id)
    else:
        storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())


def fail_stale_trials(study: optuna.Study, grace_s: float, max_retries: int) -> None:
    """Marks FAIL (and re-queues) the RUNNING trials of processes that died."""
    storage = study._storage
    if isinstance(storage, RDBStorage):
        optuna.storages.fail_stale_trials(study)
        return
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.system_attrs.get(HEARTBEAT_ATTR)
        if beat is None or now - float(beat) < grace_s:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                retry(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed it first
