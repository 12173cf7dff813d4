"""The Flower ClientApp around a `Site`: `query` (class list and size, asked before the first
round), `train` (one local fit from the global tensors) and `evaluate` (the global tensors on the
site's validation split).

The same app runs in a simulation and on a SuperNode; a site is described by its Context:
`run_config["task-config"]` (the task YAML) and `node_config` keys `data-path` (the site's data,
replacing `data.path`), `site-name` and `out-dir`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mmtune.errors import ConfigError
from mmtune.federated.arrays import from_record, to_record
from mmtune.federated.secure import is_legacy_fit, legacy_fit_inputs, legacy_fit_reply, secure_aggregation_mod
from mmtune.federated.site import Site
from mmtune.federated.strategy import SITE_KEY

_SITES: dict[tuple, Site] = {}  # built once per run and node: the task, data and model stay between rounds


def site_of(context: Context) -> Site:
    key = (context.run_id, context.node_id)
    if key not in _SITES:
        node, run = context.node_config, context.run_config
        config_path = str(node.get("task-config") or run.get("task-config") or "")
        if not config_path or not Path(config_path).is_file():
            raise ConfigError(f"site {node.get('site-name', context.node_id)}: task-config {config_path!r} not found "
                              "(set it in the run config or the SuperNode's --node-config)")
        config = yaml.safe_load(Path(config_path).read_text()) or {}
        config.pop("federated", None)
        name = str(node.get("site-name") or f"node{context.node_id}")
        overrides = {"path": str(node["data-path"])} if node.get("data-path") else None
        out_dir = Path(str(node.get("out-dir") or run.get("run-dir") or "runs/federated")) / "sites" / name
        _SITES[key] = Site(name, config, out_dir, overrides)
    return _SITES[key]


def forget_sites() -> None:
    """Drops the cached sites (between simulations in one process)."""
    _SITES.clear()


def _classes(config) -> list[str]:
    return [str(c) for c in config.get("classes", [])] if config is not None and "classes" in config else []


app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    site = site_of(context)
    info = site.describe(_classes(message.content.config_records.get("config")))
    record = ConfigRecord({"name": site.name, "classes": info["classes"] or [""], "train-samples": info["train_samples"]})
    return Message(RecordDict({SITE_KEY: record}), reply_to=message)


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    site = site_of(context)
    if is_legacy_fit(message):  # a SecAgg+ round (mmtune.federated.secure): Flower's mod masks the reply
        tensors, config = legacy_fit_inputs(message)
        site.describe(_classes(config))
        result = site.fit_round(tensors, int(config.get("local-epochs", 1)), int(config.get("local-steps", 0)))
        return legacy_fit_reply(message, result.tensors, result.samples, {"seconds": result.seconds})
    config = message.content["config"]
    site.describe(_classes(config))
    tensors = from_record(message.content["arrays"])
    result = site.fit_round(tensors, int(config.get("local-epochs", 1)), int(config.get("local-steps", 0)),
                            float(config.get("proximal-mu", 0.0)))
    metrics = MetricRecord({"num-examples": result.samples, "seconds": result.seconds,
                            "loss": result.metrics.get("train/loss", float("nan"))})
    site_record = ConfigRecord({"name": site.name, "samples": result.samples, "seconds": result.seconds,
                                **{k: v for k, v in result.metrics.items() if k.startswith("train/")}})
    return Message(RecordDict({"arrays": to_record(result.tensors), "metrics": metrics, SITE_KEY: site_record}),
                   reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    site = site_of(context)
    site.describe(_classes(message.content["config"]))
    samples, metrics = site.evaluate(from_record(message.content["arrays"]))
    values = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("val/")}
    record = MetricRecord({"num-examples": samples, **values})
    return Message(RecordDict({"metrics": record, SITE_KEY: ConfigRecord({"name": site.name})}), reply_to=message)


