"""Flower's strategies (FedAvg, FedProx, FedAdam, the DP wrappers), and `CheckedStrategy` around
them: the site checks and the per-round report that Flower's strategies do not make.

Aggregation itself is Flower's (`aggregate_arrayrecords`: the average weighted by `num-examples`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from mmtune.errors import ConfigError
from mmtune.federated.arrays import mismatch
from mmtune.federated.spec import FederatedSpec

log = logging.getLogger("mmtune")

SITE_KEY = "site"  # the ConfigRecord in every reply: {"name": ..., metrics of the site}


def build_strategy(spec: FederatedSpec, sites: int) -> Strategy:
    """Flower's strategy for `spec`, wrapped in Flower's server-side DP clipping when enabled.

    SecAgg+ is refused here: in flwr 1.42 it exists only as a workflow of the legacy strategy API
    (`flwr.server.workflow.SecAggPlusWorkflow` with `flwr.server.strategy`), which does not compose
    with the Message-API strategies built here; `run_federation` runs that workflow instead
    (`mmtune.federated.secure`)."""
    if spec.secure_aggregation:
        raise ConfigError("federated.secure_aggregation: SecAgg+ is not available with Flower's Message-API "
                          "strategies in flwr 1.42 (only the legacy workflow has it: mmtune.federated.secure)")
    common = {"fraction_train": spec.fraction_fit, "fraction_evaluate": spec.fraction_evaluate,
              "min_train_nodes": min(spec.min_sites, sites), "min_evaluate_nodes": min(spec.min_sites, sites) if spec.fraction_evaluate else 0,
              "min_available_nodes": min(spec.min_sites, sites)}
    if spec.strategy == "fedprox":
        strategy: Strategy = FedProx(proximal_mu=spec.proximal_mu, **common)
    elif spec.strategy == "fedadam":
        strategy = FedAdam(eta=spec.server_lr, eta_l=spec.server_lr_local, tau=spec.tau, **common)
    else:
        strategy = FedAvg(**common)
    if spec.privacy.enabled:
        sampled = max(int(sites * spec.fraction_fit), min(spec.min_sites, sites))
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, spec.privacy.noise_multiplier,
                                                              spec.privacy.clipping_norm, sampled)
    return strategy


def site_name(message: Message, names: dict[int, str]) -> str:
    record = message.content.config_records.get(SITE_KEY) if message.has_content() else None
    if record is not None and "name" in record:
        return str(record["name"])
    return names.get(message.metadata.src_node_id, f"node {message.metadata.src_node_id}")


class CheckedStrategy(Strategy):
    """Delegates to a Flower strategy; before aggregation it rejects replies whose tensors do not fit
    the global model (keys or shapes: a stale or mismatched adapter, named by site), logs sites that
    failed or dropped out, and records each round's per-site metrics, bytes and time in `rounds`."""

    def __init__(self, inner: Strategy, node_names: dict[int, str]) -> None:
        self.inner = inner
        self.node_names = node_names
        self.rounds: dict[int, dict] = {}
        self._global: Optional[ArrayRecord] = None
        self._started: dict[int, float] = {}

    def summary(self) -> None:
        self.inner.summary()

    def _round(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, {"round": server_round, "sites": {}, "rejected": {}, "dropped": {},
                                                     "bytes_sent": 0, "bytes_received": 0})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays
        self._started[server_round] = time.perf_counter()
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._round(server_round)["bytes_sent"] += len(messages) * arrays.count_bytes()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        entry = self._round(server_round)
        expected = {k: v for k, v in (self._global or {}).items()}
        accepted = []
        for message in replies:
            name = site_name(message, self.node_names)
            if message.has_error():
                entry["dropped"][name] = message.error.reason.splitlines()[-1] if message.error.reason else "no reason"
                log.warning("[mmtune] round %d: site %s dropped out (%s); the round goes on with the others",
                            server_round, name, entry["dropped"][name])
                continue
            arrays = next(iter(message.content.array_records.values()), None)
            problem = "no tensors in the reply" if arrays is None else mismatch(expected, dict(arrays.items()))
            if problem:
                entry["rejected"][name] = problem
                log.warning("[mmtune] round %d: rejected the update of site %s: %s", server_round, name, problem)
                continue
            entry["bytes_received"] += arrays.count_bytes()
            site = dict(message.content.config_records.get(SITE_KEY, {}))
            site.pop("name", None)
            entry["sites"].setdefault(name, {}).update({f"fit/{k}": v for k, v in site.items()})
            accepted.append(message)
        if not accepted:
            log.warning("[mmtune] round %d: no usable update; the global model stays as it was", server_round)
            return None, None
        return self.inner.aggregate_train(server_round, accepted)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._round(server_round)["bytes_sent"] += len(messages) * arrays.count_bytes()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        entry = self._round(server_round)
        good = []
        for message in replies:
            name = site_name(message, self.node_names)
            if message.has_error():
                entry["dropped"].setdefault(name, "failed in evaluation")
                log.warning("[mmtune] round %d: site %s failed to evaluate", server_round, name)
                continue
            metrics = dict(next(iter(message.content.metric_records.values())))
            entry["sites"].setdefault(name, {}).update({f"val/{k}": v for k, v in metrics.items()})
            good.append(message)
        aggregated = self.inner.aggregate_evaluate(server_round, good) if good else None
        if aggregated is not None:
            entry["global_val"] = dict(aggregated)
        entry["seconds"] = time.perf_counter() - self._started.get(server_round, time.perf_counter())
        return aggregated
