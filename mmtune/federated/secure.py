"""Secure aggregation with Flower's SecAgg+ (`federated.secure_aggregation: true`).

In flwr 1.42 SecAgg+ exists only for Flower's legacy strategy API: the server side is
`flwr.server.workflow.SecAggPlusWorkflow`, the fit step of `DefaultWorkflow` driving a legacy
`flwr.server.strategy.FedAvg`, and the site side is `flwr.client.mod.secaggplus_mod`. The
Message-API strategies of `mmtune.federated.strategy` cannot use it, so a secure federation runs this
legacy loop instead; the protocol (key exchange, masking, Shamir shares, unmasking) is all Flower's.
What is ours: the tensor names travel in the fit config (legacy parameters are an unnamed list), the
server-side test runs as the legacy centralised evaluation, and a counting grid records each round's
bytes. Each site's update is quantized within +-`clipping_range` (values beyond are clipped, so set it
above the largest trainable value, e.g. BatchNorm variances); sites are not evaluated on their own
validation splits in this mode (the server's test set scores every round).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Callable, Optional

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from mmtune.errors import ConfigError
from mmtune.federated.spec import FederatedSpec

log = logging.getLogger("mmtune")

NAMES_KEY = "tensor-names"  # fit config entry: the names of the legacy parameter list, in order
SHAPES_KEY = "tensor-shapes"  # and their shapes ("2,3"; "" for a scalar)
# 0-d tensors travel as shape (1,): flwr 1.42's SecAgg+ unmasking shifts and rescales each dequantized
# array in place, which a 0-d array (a numpy scalar there) silently skips (a temperature of 1.0 came
# back as 16.03 from 3 sites).


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(",") if n)


class CountingGrid:
    """Delegates to a Grid and adds up the bytes of the ArrayRecords it sends and receives, per round
    (SecAgg+ messages carry the round in `group_id`)."""

    def __init__(self, grid: Grid, rounds: dict[int, dict]) -> None:
        self._grid, self.rounds = grid, rounds

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _entry(self, message: Message) -> dict:
        group = message.metadata.group_id
        key = int(group) if str(group).isdigit() else 0
        return self.rounds.setdefault(key, {"round": key, "sites": {}, "rejected": {}, "dropped": {},
                                            "bytes_sent": 0, "bytes_received": 0, "secure_aggregation": True})

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            self._entry(message)["bytes_sent"] += sum(r.count_bytes() for r in message.content.array_records.values())
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                self._entry(reply)["bytes_received"] += sum(r.count_bytes() for r in reply.content.array_records.values())
        return replies


def check_secure_spec(spec: FederatedSpec, sites: int) -> None:
    if spec.strategy != "fedavg":
        raise ConfigError(f"federated.secure_aggregation works with strategy fedavg only (flwr 1.42's SecAgg+ "
                          f"workflow drives the legacy FedAvg), not {spec.strategy!r}")
    if spec.privacy.enabled:
        raise ConfigError("federated.secure_aggregation and federated.privacy together are not supported: Flower's "
                          "server-side DP wrapper needs each site's update, which SecAgg+ hides")
    if sites < 2:
        raise ConfigError(f"federated.secure_aggregation needs at least 2 sites per round; {sites} connected")


def run_secure_rounds(grid: Grid, spec: FederatedSpec, initial: ArrayRecord, train_config: dict,
                      evaluate_fn: Callable[[int, ArrayRecord], Optional[dict]], rounds: dict[int, dict],
                      sites: int) -> ArrayRecord:
    """Runs `spec.rounds` rounds of FedAvg whose aggregation is Flower's SecAgg+; returns the global tensors."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.supercore.run import Run

    check_secure_spec(spec, sites)
    names = list(initial.keys())
    initial_arrays = [initial[k].numpy() for k in names]
    shapes = [",".join(str(n) for n in a.shape) for a in initial_arrays]

    def named(ndarrays) -> ArrayRecord:
        import torch

        return ArrayRecord({k: torch.from_numpy(np.asarray(a, dtype=ref.dtype).reshape(ref.shape).copy())
                            for k, a, ref in zip(names, ndarrays, initial_arrays)})

    def fit_config(server_round: int) -> dict:
        return {**train_config, NAMES_KEY: names, SHAPES_KEY: shapes}

    def evaluate(server_round: int, ndarrays, config) -> Optional[tuple[float, dict]]:
        metrics = evaluate_fn(server_round, named(ndarrays))
        return None if metrics is None else (float(metrics.get("test/loss", 0.0)), dict(metrics))

    secagg = spec.secagg
    wanted = max(int(sites * spec.fraction_fit), min(max(spec.min_sites, 2), sites))
    strategy = LegacyFedAvg(fraction_fit=spec.fraction_fit, fraction_evaluate=0.0, min_fit_clients=wanted,
                            min_evaluate_clients=0, min_available_clients=wanted,
                            initial_parameters=ndarrays_to_parameters([np.atleast_1d(a) for a in initial_arrays]),
                            on_fit_config_fn=fit_config, evaluate_fn=evaluate)
    workflow = SecAggPlusWorkflow(num_shares=secagg.num_shares, reconstruction_threshold=secagg.reconstruction_threshold,
                                  clipping_range=secagg.clipping_range, max_weight=secagg.max_weight,
                                  timeout=secagg.timeout)
    if getattr(grid, "run", None) is None and hasattr(grid, "set_run"):
        grid.set_run(Run.create_empty(0))  # the in-process grid: the legacy client manager reads grid.run.run_id
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=spec.rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=workflow)(CountingGrid(grid, rounds), context)
    final = context.state.array_records[MAIN_PARAMS_RECORD]
    return named(parameters_to_ndarrays(compat.arrayrecord_to_parameters(final, keep_input=True)))


def is_legacy_fit(message: Message) -> bool:
    """A train message of the SecAgg+ workflow's masked-vector stage (legacy FitIns content)."""
    return "fitins.parameters" in message.content.array_records


def legacy_fit_inputs(message: Message) -> tuple[dict, dict]:
    """(named tensors, train config) from a legacy FitIns message."""
    import torch
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    # read the records directly: Flower's FitIns conversion refuses list values (the names, the classes)
    config = dict(message.content.config_records["fitins.config"])
    names = [str(n) for n in config.get(NAMES_KEY, [])]
    shapes = [_shape(str(t)) for t in config.get(SHAPES_KEY, [])]
    params = compat.arrayrecord_to_parameters(message.content.array_records["fitins.parameters"], keep_input=True)
    arrays = parameters_to_ndarrays(params)
    if not len(names) == len(shapes) == len(arrays):
        raise ConfigError(f"a SecAgg+ fit message holds {len(arrays)} tensors but names {len(names)} "
                          f"and {len(shapes)} shapes")
    return {k: torch.from_numpy(np.array(a).reshape(shape)) for k, a, shape in zip(names, arrays, shapes)}, config


def legacy_fit_reply(message: Message, tensors: dict, samples: int, metrics: dict) -> Message:
    """The legacy FitRes reply `secaggplus_mod` masks: the tensors in the order the server named them."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    names = [str(n) for n in message.content.config_records["fitins.config"][NAMES_KEY]]
    params = ndarrays_to_parameters([np.atleast_1d(tensors[k].numpy()) for k in names])
    fitres = FitRes(Status(Code.OK, "ok"), params, int(samples), {k: float(v) for k, v in metrics.items()})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


def secure_aggregation_mod(message: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the messages of a SecAgg+ round; other train messages pass."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


__all__ = ["CountingGrid", "run_secure_rounds", "secure_aggregation_mod"]
