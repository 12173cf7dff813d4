"""Sites simulated on one machine.

The ClientApp of every site runs in this process, one after another, through `InProcessGrid`, a Flower `Grid` that delivers each message by calling the app. It is
written here because Flower's only simulation backend is ray, which took 35 s to run an empty
two-site app on a 2-core machine before any model was built (and starts a process per site that
imports torch again).
"""

from __future__ import annotations

import copy
import csv
import logging
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from mmtune.data.splits import add_split_column
from mmtune.errors import ConfigError
from mmtune.federated.partition import read_rows, write_site_manifests

log = logging.getLogger("mmtune")


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApps in this process. A site whose app raises answers with an
    error reply, as a SuperNode that failed would (the strategy leaves it out of the round)."""

    def __init__(self, app: ClientApp, contexts: dict[int, Context],
                 handler: Optional[Callable[[ClientApp, Message, Context], Message]] = None) -> None:
        self.app, self.contexts = app, contexts
        self.handler = handler or (lambda app, message, context: app(message, context))
        self._run = None
        # The process identity Flower's Message reads (a SuperLink's ServerApp process sets it at start).
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid answers in send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            # each site gets its own copy, as over a network: Flower's SecAgg+ workflow sends one content
            # object to every site and its mod edits what it receives
            message = copy.deepcopy(message)
            try:
                replies.append(self.handler(self.app, message, context))
            except Exception as err:  # noqa: BLE001 - a failing site is a dropped site, as with a SuperNode
                reason = "".join(traceback.format_exception_only(type(err), err)).strip()
                log.debug("site on node %s failed:\n%s", context.node_id, traceback.format_exc())
                replies.append(Message(Error(code=1, reason=reason), reply_to=message))
        return replies


def split_into_sites(manifest: Path, out_dir: Path, sites: int, partition_by: str, split_ratios, seed: int,
                     alpha: float, partition_seed: int, group_column: Optional[str] = None,
                     label_column: str = "label", label_separator: str = "|",
                     stratify: bool = True) -> tuple[Path, list[Path]]:
    """`pooled.csv` (the manifest with a fixed train/val/test column, so the server's test split is
    every site's test rows and a centralised run on it sees the same split) and one manifest per site."""
    header, rows = read_rows(manifest)
    header = add_split_column(header, rows, split_ratios, seed, group_column, label_column, label_separator, stratify)
    for row in rows:
        if not Path(row["path"]).is_absolute():
            row["path"] = str((manifest.parent / row["path"]).resolve())
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled = out_dir / "pooled.csv"
    with pooled.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return pooled, write_site_manifests(pooled, out_dir / "sites", sites, partition_by, label_column, alpha, partition_seed)


def site_contexts(config_path: Path, manifests: list[Path], run_dir: Path) -> dict[int, Context]:
    """One Flower Context per simulated site (node ids 1..N), as a SuperNode's node config would hold."""
    from flwr.app import RecordDict as Records

    contexts = {}
    for k, manifest in enumerate(manifests):
        node_config = {"task-config": str(config_path), "data-path": str(manifest), "site-name": f"site_{k}",
                       "out-dir": str(run_dir), "partition-id": k, "num-partitions": len(manifests)}
        contexts[k + 1] = Context(run_id=0, node_id=k + 1, node_config=node_config, state=Records(),
                                  run_config={"task-config": str(config_path), "run-dir": str(run_dir)})
    return contexts


def data_args(config: dict) -> dict:
    init = ((config.get("data") or {}).get("init_args")) or {}
    if not init.get("path"):
        raise ConfigError("--simulate splits the task's data.init_args.path; the config names none")
    return init
