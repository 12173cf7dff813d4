"""The server side: the global model (built from the same task YAML), the site check before the
first round, Flower's strategy loop, the server-side test set, the per-round report and the final
global model as an ordinary mmtune checkpoint."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Optional

import lightning as L
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from mmtune.errors import ConfigError, DataError
from mmtune.federated.arrays import from_record, full_model_bytes, load_tensors, to_record, trainable_tensors
from mmtune.federated.site import build_task_and_data, round_trainer_kwargs
from mmtune.federated.spec import FederatedSpec
from mmtune.federated.strategy import SITE_KEY, CheckedStrategy, build_strategy
from mmtune.files import atomic_write, update_json

log = logging.getLogger("mmtune")


class GlobalModel:
    """The server's copy of the task: holds the global tensors, scores them on the server's test set
    and saves them as a checkpoint. `data_path` (a labeled manifest or folder) gives the class list
    and the test split; without it the config must fix `model.init_args.classes`."""

    def __init__(self, config: dict, out_dir: Path, data_path: Optional[str]) -> None:
        self.out_dir = out_dir
        self.task, self.data = build_task_and_data(config, {"path": data_path} if data_path else None)
        self.has_data = bool(data_path)
        self.trainer_kwargs = round_trainer_kwargs(config)
        classes = self.task.hparams.get("classes") if hasattr(self.task.hparams, "get") else None
        if not classes and self.has_data:
            self.data.prepare_data()
            self.data.setup("fit")
            classes = list(getattr(self.data, "classes", []) or [])
            if classes:
                self.task.hparams.classes = classes
        self.classes: list[str] = list(classes or [])
        self.task.configure_model()  # the global model's initial trainable tensors
        self.full_bytes = full_model_bytes(self.task)
        self._trainer: Optional[L.Trainer] = None

    def initial(self) -> ArrayRecord:
        return to_record(trainable_tensors(self.task))

    def _trainer_for(self) -> L.Trainer:
        kwargs = {"accelerator": "cpu", **self.trainer_kwargs, "logger": False, "enable_checkpointing": False,
                  "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(self.out_dir)}
        return L.Trainer(**kwargs)

    def test(self, arrays: ArrayRecord) -> dict[str, float]:
        """The global tensors on the test split of the server's data."""
        load_tensors(self.task, from_record(arrays), "the global model")
        self._trainer = self._trainer_for()
        results = self._trainer.test(self.task, datamodule=self.data, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items() if "/" in k and k.count("/") == 1}

    def save(self, arrays: ArrayRecord, path: Path) -> Path:
        """The global model as an mmtune checkpoint (trainable-only when the task saves that way)."""
        load_tensors(self.task, from_record(arrays), "the global model")
        if self._trainer is None:
            if not self.has_data:
                raise ConfigError("saving the global model needs server-side data (federated.test_path)")
            self._trainer = self._trainer_for()
            self._trainer.validate(self.task, datamodule=self.data, verbose=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._trainer.save_checkpoint(str(path), weights_only=True)
        return path


def wait_for_sites(grid: Grid, count: int, timeout: float = 300, poll: float = 0.5) -> list[int]:
    """The connected nodes, once at least `count` are connected or `timeout` seconds passed (SuperNodes
    of a deployment connect at their own pace; Flower's strategies wait the same way for
    `min_available_nodes`, but only from the first round on, after the site check)."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(poll)
        nodes = list(grid.get_node_ids())
    if len(nodes) < count:
        log.warning("[mmtune] %d of the %d sites (federated.min_sites) connected after %.0f s; going on with them",
                    len(nodes), count, timeout)
    return nodes


def ask_sites(grid: Grid, classes: list[str], timeout: float = 600) -> dict[int, dict]:
    """Asks every connected site for its class list and training size before the first round.

    Raises:
        DataError: a site has classes outside the federation's class list (site and classes named),
            or a site failed to answer (its error named).
    """
    config = ConfigRecord({"classes": classes or [""]})
    messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in grid.get_node_ids()]
    answers: dict[int, dict] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise DataError(f"site on node {node} failed before the first round: {reply.error.reason}")
        record = reply.content.config_records[SITE_KEY]
        own = [c for c in record["classes"] if c]
        answers[node] = {"name": str(record["name"]), "classes": own, "train_samples": int(record["train-samples"])}
    known = set(classes)
    for info in answers.values():
        extra = sorted(set(info["classes"]) - known) if known else []
        if extra:
            raise DataError(f"site {info['name']} has classes {info['classes']}, which differ from the federation's "
                            f"class list {classes} (unknown: {extra}); give every site the same label names")
    return answers


def run_federation(grid: Grid, config: dict, spec: FederatedSpec, run_dir: Path, server_data: Optional[str]) -> dict:
    """Runs the rounds and writes `federated.json`, `rounds.csv` and `checkpoints/global.ckpt` in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model = GlobalModel(config, run_dir / "server", server_data)
    wait_for_sites(grid, spec.min_sites)
    sites = ask_sites(grid, model.classes)
    if not sites:
        raise ConfigError("no site connected to the federation")
    names = {node: info["name"] for node, info in sites.items()}
    initial = model.initial()
    test_rows: dict[int, dict] = {}
    if spec.secure_aggregation:
        return _run_secure(grid, spec, model, sites, initial, run_dir, test_rows)
    strategy = CheckedStrategy(build_strategy(spec, len(sites)), names)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
        if not model.has_data:
            return None
        test_rows[server_round] = model.test(arrays)
        _write_report(run_dir, spec, sites, model, initial, strategy.rounds, test_rows, None)
        return MetricRecord({k.replace("/", "-"): v for k, v in test_rows[server_round].items()})

    train_config = ConfigRecord({"classes": model.classes or [""], "local-epochs": spec.local_epochs,
                                 "local-steps": spec.local_steps})
    start = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=spec.rounds, train_config=train_config,
                            evaluate_config=ConfigRecord({"classes": model.classes or [""]}), evaluate_fn=evaluate_fn)
    final = result.arrays if result.arrays is not None else initial
    ckpt = model.save(final, run_dir / "checkpoints" / "global.ckpt")
    return _write_report(run_dir, spec, sites, model, initial, strategy.rounds, test_rows,
                         {"checkpoint": str(ckpt), "seconds": time.perf_counter() - start})


def _run_secure(grid: Grid, spec: FederatedSpec, model: GlobalModel, sites: dict, initial: ArrayRecord,
                run_dir: Path, test_rows: dict) -> dict:
    """The rounds with Flower's SecAgg+ (`mmtune.federated.secure`): the server sees only the sum."""
    from mmtune.federated.secure import run_secure_rounds

    rounds: dict[int, dict] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> Optional[dict]:
        if not model.has_data:
            return None
        test_rows[server_round] = model.test(arrays)
        _write_report(run_dir, spec, sites, model, initial, rounds, test_rows, None)
        return test_rows[server_round]

    train_config = {"classes": model.classes or [""], "local-epochs": spec.local_epochs, "local-steps": spec.local_steps}
    start = time.perf_counter()
    final = run_secure_rounds(grid, spec, initial, train_config, evaluate_fn, rounds, len(sites))
    ckpt = model.save(final, run_dir / "checkpoints" / "global.ckpt")
    return _write_report(run_dir, spec, sites, model, initial, rounds, test_rows,
                         {"checkpoint": str(ckpt), "seconds": time.perf_counter() - start})


def _write_report(run_dir: Path, spec: FederatedSpec, sites: dict, model: GlobalModel, initial: ArrayRecord,
                  rounds: dict, tests: dict, final: Optional[dict]) -> dict:
    import dataclasses

    adapter_bytes = initial.count_bytes()
    report = {
        "spec": dataclasses.asdict(spec),
        "sites": {info["name"]: {k: v for k, v in info.items() if k != "name"} for info in sites.values()},
        "classes": model.classes,
        "bytes_per_message": {"trainable": adapter_bytes, "full_model": model.full_bytes,
                              "share": adapter_bytes / model.full_bytes if model.full_bytes else None},
        "rounds": [{**rounds.get(r, {"round": r}), "global_test": tests.get(r)} for r in sorted(set(rounds) | set(tests))],
        "final": final,
    }
    with atomic_write(run_dir / "federated.json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    with atomic_write(run_dir / "rounds.csv", "w") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "site", "metric", "value"])
        for entry in report["rounds"]:
            for site, values in (entry.get("sites") or {}).items():
                for key, value in sorted(values.items()):
                    writer.writerow([entry["round"], site, key, value])
            for key, value in sorted((entry.get("global_val") or {}).items()):
                writer.writerow([entry["round"], "global", f"val/{key}", value])
            for key, value in sorted((entry.get("global_test") or {}).items()):
                writer.writerow([entry["round"], "server", key, value])
            for key in ("bytes_sent", "bytes_received", "seconds"):
                if key in entry:
                    writer.writerow([entry["round"], "server", key, entry[key]])
            for site, why in {**entry.get("dropped", {}), **entry.get("rejected", {})}.items():
                writer.writerow([entry["round"], site, "excluded", why])
    if final is not None:
        last = report["rounds"][-1] if report["rounds"] else {}
        update_json(run_dir / "metrics.json", "federated", {"rounds": len(report["rounds"]) - (1 if 0 in tests else 0),
                                                            "global_test": last.get("global_test"),
                                                            "bytes_per_message": report["bytes_per_message"]})
    return report
